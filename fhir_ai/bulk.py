"""Bulk scoring: a Bulk-Data NDJSON folder → one RiskAssessment per patient per model, as NDJSON."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson
from tqdm import tqdm

from .assessment import is_not_applicable
from .errors import BadRequest
from .features import Extractor
from .features.ndjson import NdjsonExport
from .models.registry import ModelRegistry
from .pipeline import build_assessments

log = logging.getLogger(__name__)

TYPES = ("Patient", "Encounter", "Observation")
CHUNK_PATIENTS = 2000     # patients scored at a time: bounds memory, large enough for vectorised work
_LINE = orjson.OPT_APPEND_NEWLINE


@dataclass
class BulkStats:
    """What a run scored; ``assessed``, ``insufficient`` and ``not_applicable`` count assessments (one per
    patient per model): ``insufficient`` too little data, ``not_applicable`` a model that is not for the
    patient's current visit (mapping ``scoring.encounter_classes``)."""
    patients: int
    assessed: int
    insufficient: int
    resources_read: int
    seconds: float
    not_applicable: int = 0

    def summary(self) -> str:
        """'N patients (a assessed, i insufficient data, n not applicable)', for the log and the CLI."""
        return (f"{self.patients} patients ({self.assessed} assessed, {self.insufficient} insufficient data, "
                f"{self.not_applicable} not applicable)")

    @property
    def patients_per_second(self) -> float:
        return self.patients / self.seconds if self.seconds else float("inf")


def input_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise BadRequest(f"no such folder: {directory}", expression="--input")
    files = [p for p in sorted(directory.iterdir())
             if p.is_file() and p.name.split(".", 1)[0] in TYPES and (p.name.endswith(".ndjson")
                                                                       or p.name.endswith(".ndjson.gz"))]
    if not files:
        raise BadRequest(f"{directory} holds no Patient/Encounter/Observation NDJSON files", expression="--input")
    # Patients and Encounters first: cheap, and they anchor the Observations.
    return sorted(files, key=lambda p: TYPES.index(p.name.split(".", 1)[0]))


def bulk_assess(input_dir: Path | str, output: Path | str, registry: ModelRegistry, *,
                models: list[str], as_of: datetime | None = None, explain: str = "elevated",
                news2: bool = False, progress: bool = True, chunk_patients: int = CHUNK_PATIENTS) -> BulkStats:
    """Score everyone in the folder. Without ``as_of`` each patient is assessed as of their own latest data.

    Streaming: the export is staged by DuckDB and scored ``chunk_patients`` whole patients at a time, so
    memory does not grow with the size of the export. Output is NDJSON, chunk by chunk, model by model.
    """
    started = time.perf_counter()
    files = input_files(Path(input_dir))
    pairs = [registry.get(model_id) for model_id in models]
    codes = [code for _, mapping in pairs for code in mapping.code_index]
    assessed = insufficient = not_applicable = 0
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with NdjsonExport(files, codes, chunk_patients=chunk_patients) as export, open(output, "wb") as out, \
            tqdm(total=export.patients, unit="patients", desc="scoring", disable=not progress) as bar:
        patients = 0
        for chunk in export:
            rows = 0
            for model, mapping in pairs:
                extractor = Extractor(mapping)
                extractor.add_all(chunk.resources)
                extractor.add_columns(chunk.columns)
                fs = extractor.finish(as_of=as_of)
                rows = max(rows, len(fs.patient_ids))
                scored, built = build_assessments(model, fs, explain=explain, news2=news2)
                out.write(b"".join([orjson.dumps(resource, option=_LINE) for rs in built for resource in rs]))
                ok = sum(item.sufficient for item in scored)
                unfit = sum(not item.sufficient and is_not_applicable(item.insufficient_reason) for item in scored)
                assessed += ok
                not_applicable += unfit
                insufficient += len(scored) - ok - unfit
            patients += rows
            bar.update(chunk.patients)
        count = export.resources_read
    stats = BulkStats(patients, assessed, insufficient, count, time.perf_counter() - started,
                      not_applicable=not_applicable)
    log.info("bulk-assess: %s from %d resources in %.1f s", stats.summary(), count, stats.seconds)
    return stats
