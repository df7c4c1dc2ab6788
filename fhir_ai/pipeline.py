"""The only module that knows every stage: fetch → map → features → score → build → store → write back."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from . import assessment
from .config import Settings
from .errors import FhirAiError, NotFound, Unprocessable, UpstreamError
from .features import Extractor, FeatureSet
from .features.extract import pinned_encounter_problem
from .fhir import smart, times
from .fhir.sources import Source, make_source
from .mapping import Mapping, load_directory
from .models.registry import ModelRegistry
from .assessment import Scored
from .models.registry import LoadedModel
from .models.scoring import news2_scores, score_binary, score_triage
from .store import NewAssessment, Store
from .store.provenance import MappingUsed

log = logging.getLogger(__name__)


@dataclass
class AssessResult:
    """What one $assess produced: resources (stored versions) and warnings for the OperationOutcome."""
    resources: list[dict[str, Any]] = field(default_factory=list)
    issues: list[dict[str, Any]] = field(default_factory=list)
    created: list[bool] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)    # each resource's stored JSON (Saved.text)


def warning(code: str, text: str, expression: str | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": "warning", "code": code, "diagnostics": text}
    if expression:
        issue["expression"] = [expression]
    return issue


class Pipeline:
    """Wires source, mappings, models and store together; one instance per process."""

    def __init__(self, settings: Settings, registry: ModelRegistry, source: Source, store: Store) -> None:
        self.settings = settings
        self.registry = registry
        self.source = source
        self.store = store

    @classmethod
    def from_settings(cls, settings: Settings) -> "Pipeline":
        mappings = load_directory(settings.mappings_dir)          # refuses to start on a bad mapping
        registry = ModelRegistry.load(settings.models_dir, mappings)
        source = make_source(settings.source_url, token=settings.source_token, timeout=settings.source_timeout,
                             retries=settings.source_retries, retry_after_cap=settings.source_retry_after_cap,
                             auth=smart.auth_from_settings(settings) if not settings.source_is_folder else None,
                             batch=settings.source_batch_mode)
        return cls(settings, registry, source, Store(settings.effective_database_url))

    def close(self) -> None:
        self.source.close()
        self.store.close()

    # -- single patient ------------------------------------------------------------------------
    def fetch(self, patient_id: str, model_ids: list[str], as_of: datetime,
              loaded: dict[str, tuple[LoadedModel, Mapping]] | None = None) -> list[dict[str, Any]]:
        """Pull what the mappings of these models need for one patient: Patient, Encounters, Observations."""
        codes: dict[tuple[str, str], None] = {}
        lookback: float | None = 0.0
        for model_id in model_ids:
            mapping = (loaded[model_id] if loaded else self.registry.get(model_id))[1]
            codes.update(dict.fromkeys(mapping.query_codes()))
            span = mapping.longest_lookback()
            lookback = None if span is None or lookback is None else max(lookback, span)
        since = None if lookback is None else as_of - timedelta(seconds=lookback)
        return self.source.record(patient_id, list(codes), since=since, until=as_of)

    def features_for(self, patient_id: str, model_ids: list[str], as_of: datetime,
                     resources: list[dict[str, Any]] | None = None,
                     encounter: str | None = None,
                     loaded: dict[str, tuple[LoadedModel, Mapping]] | None = None) -> dict[str, FeatureSet]:
        """Each model's features for one patient, from ``resources`` (default: fetched from the source).

        ``encounter`` pins the visit to assess (e.g. the ED encounter being triaged); NotFound if the
        patient has no such encounter. ``loaded``: the (model, mapping) of each model, taken once by the
        caller so that a $reload meanwhile cannot pair one model with another mapping's features.
        """
        loaded = loaded or {model_id: self.registry.get(model_id) for model_id in model_ids}
        if resources is None:
            resources = self.fetch(patient_id, model_ids, as_of, loaded)
        if encounter is not None:
            where = "Parameters.parameter.where(name='encounter')"
            found = next((r for r in resources if r.get("resourceType") == "Encounter" and r.get("id") == encounter),
                         None)
            if found is None:
                raise NotFound(f"Encounter/{encounter} is not an encounter of Patient/{patient_id}", expression=where)
            problem = pinned_encounter_problem(found, as_of.timestamp())
            if problem:
                # Its windows would read data from outside the visit, and the answer would be labelled with it.
                raise Unprocessable(f"Encounter/{encounter} {problem} ({times.format_datetime(as_of)}): an assessment "
                                    "as of then is not one of this encounter; give an asOf within it", expression=where)
        pinned = {patient_id: encounter} if encounter else None
        out = {}
        for model_id in model_ids:
            extractor = Extractor(loaded[model_id][1])
            extractor.add_all(resources)
            out[model_id] = extractor.finish(as_of=as_of, patient_ids=[patient_id], encounters=pinned)
        return out

    def assess(self, patient_id: str, *, models: list[str] | None = None, as_of: datetime | None = None,
               write_back: bool | None = None, resources: list[dict[str, Any]] | None = None,
               encounter: str | None = None) -> AssessResult:
        """Assess one patient: pulled from the source, or from ``resources`` the caller sent (push mode)."""
        models = models or ["deterioration"]
        # Each model with its mapping, taken once (unknown model: fail before fetching anything).
        loaded = {model_id: self.registry.get(model_id) for model_id in models}
        as_of = as_of or assessment.now()
        write_back = self.settings.write_back if write_back is None else write_back
        result = AssessResult()
        planned: list[tuple[list[dict[str, Any]], list[dict[str, Any]], MappingUsed]] = []  # per model
        for model_id, fs in self.features_for(patient_id, models, as_of, resources, encounter, loaded).items():
            model, _ = loaded[model_id]
            scored, resources_out = build_assessments(model, fs)
            issues = []
            if not scored[0].sufficient:
                issues.append(warning("incomplete", f"{model_id}: not assessed, " + scored[0].insufficient_reason))
            if scored[0].dropped:
                issues.append(warning("value", f"{model_id}: {len(scored[0].dropped)} value(s) not used "
                                      "(see RiskAssessment.note)"))
            # The mapping these features were read with, even if a $reload has replaced it since.
            planned.append((issues, resources_out[0], MappingUsed.of(fs.mapping)))
        self._store(planned, patient_id, write_back, result)
        return result

    def _store(self, planned: list[tuple[list[dict[str, Any]], list[dict[str, Any]], MappingUsed]],
               patient_id: str, write_back: bool, result: AssessResult) -> None:
        """Store every assessment of one request in one transaction, then write each back (in order,
        each model's warnings before its write-back issues)."""
        target = self._target() if write_back else None
        items = []
        for _, resources, mapping in planned:
            for resource in resources:
                assessment.validate(resource)
                method = resource["method"]["coding"][0]
                items.append(NewAssessment(resource, method["code"], method["version"], target, mapping))
        saved_all = iter(self.store.save_assessments(items))
        for issues, resources, _ in planned:
            result.issues.extend(issues)
            for resource in resources:
                saved = next(saved_all)
                if not saved.created and saved.resource.get("status") == "entered-in-error":
                    # A repeat of a withdrawn assessment: the same data give the same answer, which a
                    # clinician marked wrong. It is returned as it stands (status entered-in-error), never
                    # as a current risk; new data make a new assessment.
                    result.issues.append(warning(
                        "business-rule", f"{resource['method']['coding'][0]['code']}: RiskAssessment/"
                        f"{saved.resource['id']} for these same data was withdrawn as entered in error; it is "
                        "returned as it stands and is no current risk (new data make a new assessment)"))
                result.resources.append(saved.resource)
                result.created.append(saved.created)
                result.texts.append(saved.text)
                log.info("assessment %s for patient %s (%s, %s)", resource["id"], patient_id,
                         resource["method"]["coding"][0]["code"], "new" if saved.created else "repeat")
                if write_back:
                    issue = self.write_back(saved.resource)
                    if issue and issue not in result.issues:     # 'write-back skipped' once, not per resource
                        result.issues.append(issue)

    # -- write-back ----------------------------------------------------------------------------
    def _target(self) -> str | None:
        return None if self.source.read_only else self.settings.source_url.rstrip("/")

    def write_back(self, resource: dict[str, Any], *, retries: int | None = 0) -> dict[str, Any] | None:
        """Deliver a stored resource's pending write-back now; a failure stays queued (never lost).

        A request that is waiting for its answer makes one attempt (``retries=0``): during an outage it
        must not hang on back-offs; the queue (``fhir-ai worker``) retries with backoff and a circuit.
        """
        if self.source.read_only:
            return warning("informational", "write-back skipped: the configured source is a read-only folder")
        pending = [row for row in self.store.outbox(resource_id=resource["id"]) if row.status != "delivered"]
        for row in pending:
            try:
                self.source.write(outbound(resource), retries=retries)
            except UpstreamError as exc:
                self.store.record_delivery(row.id, ok=False, error=exc.message, permanent=not exc.temporary)
                log.warning("write-back of %s failed (%s); %s", resource["id"], exc.upstream_status,
                            "will retry" if exc.temporary else "needs attention")
                return warning("transient" if exc.temporary else "exception",
                               f"write-back of RiskAssessment/{resource['id']} to the hospital server failed "
                               f"({exc.message}); it is stored here and queued for retry")
            except FhirAiError as exc:
                self.store.record_delivery(row.id, ok=False, error=exc.message, permanent=True)
                return warning("exception", f"write-back of RiskAssessment/{resource['id']} failed: {exc.message}")
            self.store.record_delivery(row.id, ok=True)
        return None

    def retry_write_backs(self) -> dict[str, int]:
        """Deliver every pending write-back (the CLI's `write-back retry`)."""
        counts = {"delivered": 0, "failed": 0}
        for row in self.store.outbox(status="pending"):
            resource = self.store.get_assessment(row.resource_id)
            if resource is None:
                continue
            issue = self.write_back(resource, retries=None)
            counts["failed" if issue else "delivered"] += 1
        return counts


def build_assessments(model: LoadedModel, fs: FeatureSet, *, explain: str = "all",
                      news2: bool = True) -> tuple[list[Scored], list[list[dict[str, Any]]]]:
    """Score every patient row of a FeatureSet and build its RiskAssessment(s) (the model's, then NEWS2)."""
    if model.kind == "multiclass":
        triaged = score_triage(model, fs, explain=explain)
        return list(triaged), [[assessment.triage_assessment(item)] for item in triaged]
    scored = score_binary(model, fs, explain=explain)
    out = [[assessment.binary_assessment(item)] for item in scored]
    scores = news2_scores(fs) if news2 else None
    if scores is not None:
        for row, item in enumerate(scored):
            out[row].append(assessment.news2_assessment(
                item, fs.news2_basis[row], float(scores.total[row]), float(scores.partial_total[row]),
                scores.band[row], scores.min_band[row], scores.clinical_response[row],
                {k: float(v[row]) for k, v in scores.subscores.items()}))
    return list(scored), out


def outbound(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource as we send it upstream: the hospital's server keeps its own versionId/lastUpdated."""
    out = dict(resource)
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    return out
