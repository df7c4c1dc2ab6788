"""Shared data sets (PhysioNet 2012, KTAS) as FHIR R4, the synthetic demo hospital, and NDJSON output.

Each converter follows the "FHIR representation" section of the data set's SOURCE.md and its
fhir-mapping.csv exactly, because evaluation records reach the service in that same form.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import orjson

log = logging.getLogger(__name__)

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CATEGORY_DISPLAY = {"vital-signs": "Vital Signs", "laboratory": "Laboratory",
                    "survey": "Survey", "procedure": "Procedure"}


def write_ndjson(resources: Iterable[dict[str, Any]], out_dir: str | Path) -> dict[str, int]:
    """Write resources as Bulk-Data NDJSON (one ``<resourceType>.ndjson`` per type); return counts.

    Files are opened on first use and overwritten, so a folder holds exactly one run's output
    for each type written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, IO[bytes]] = {}
    counts: dict[str, int] = {}
    try:
        for resource in resources:
            rtype = resource["resourceType"]
            fh = files.get(rtype)
            if fh is None:
                fh = files[rtype] = open(out / f"{rtype}.ndjson", "wb")
                counts[rtype] = 0
            fh.write(orjson.dumps(resource))
            fh.write(b"\n")
            counts[rtype] += 1
    finally:
        for fh in files.values():
            fh.close()
    log.info("wrote NDJSON to %s: %s", out, counts)
    return counts
