"""Bulk scoring: a Bulk-Data NDJSON folder → one RiskAssessment per patient per model, as NDJSON."""
from __future__ import annotations

import gzip
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Iterator

import orjson
from tqdm import tqdm

from .errors import BadRequest
from .features import Extractor
from .models.registry import ModelRegistry
from .pipeline import build_assessments

log = logging.getLogger(__name__)

TYPES = ("Patient", "Encounter", "Observation")


@dataclass
class BulkStats:
    patients: int
    assessed: int
    insufficient: int
    resources_read: int
    seconds: float

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


def read_resources(files: list[Path], progress: bool) -> Iterator[dict[str, Any]]:
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
        for path in files:
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as fh:
                for number, line in enumerate(fh, 1):
                    bar.update(len(line))
                    if not line.strip():
                        continue
                    try:
                        yield orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        raise BadRequest(f"{path.name}, line {number}: not valid JSON ({exc})",
                                         expression=f"{path.name}:{number}") from exc


def bulk_assess(input_dir: Path | str, output: Path | str, registry: ModelRegistry, *,
                models: list[str], as_of: datetime | None = None, explain: str = "elevated",
                news2: bool = False, progress: bool = True) -> BulkStats:
    """Score everyone in the folder. Without ``as_of`` each patient is assessed as of their own latest data."""
    started = time.perf_counter()
    files = input_files(Path(input_dir))
    pairs = [registry.get(model_id) for model_id in models]
    extractors = [Extractor(mapping) for _, mapping in pairs]
    count = 0
    for resource in read_resources(files, progress):
        count += 1
        for extractor in extractors:
            extractor.add(resource)
    assessed = insufficient = 0
    patients = 0
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "wb") as out:
        for (model, _), extractor in zip(pairs, extractors):
            fs = extractor.finish(as_of=as_of)
            patients = max(patients, len(fs.patient_ids))
            scored, built = build_assessments(model, fs, explain=explain, news2=news2)
            for item, resources in zip(tqdm(scored, desc=f"writing {model.model_id}", disable=not progress), built):
                for resource in resources:
                    _write(out, resource)
                if item.sufficient:
                    assessed += 1
                else:
                    insufficient += 1
    stats = BulkStats(patients, assessed, insufficient, count, time.perf_counter() - started)
    log.info("bulk-assess: %d patients (%d assessed, %d insufficient data) from %d resources in %.1f s",
             stats.patients, assessed, insufficient, count, stats.seconds)
    return stats


def _write(out: IO[bytes], resource: dict[str, Any]) -> None:
    out.write(orjson.dumps(resource))
    out.write(b"\n")
