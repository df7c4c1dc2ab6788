"""`fhir-ai check-site URL`: does a hospital's FHIR server offer what fhir_ai needs?

Reads the CapabilityStatement and ``.well-known/smart-configuration`` and samples Observations
to count how many of each mapping's codes the site actually uses. Reports; changes nothing.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import requests

from .config import Settings
from .errors import FhirAiError
from .fhir import smart
from .fhir.client import FhirClient
from .fhir.sources import ServerSource, declares_batch, patient_of_reference
from .mapping import load_directory

log = logging.getLogger(__name__)

# (resource, interaction, search parameters, needed for): what pipeline and write-back call.
NEEDS: list[tuple[str, str, tuple[str, ...], str, bool]] = [
    ("Patient", "read", (), "pull", True),
    ("Encounter", "search-type", ("patient",), "pull", True),
    ("Observation", "search-type", ("patient", "code", "date"), "pull", True),
    ("RiskAssessment", "update", (), "write-back (PUT by id)", True),
    ("RiskAssessment", "search-type", ("subject", "identifier"), "checking write-backs", False),
]
# Operations used when present; none is required for single-patient assessment.
OPERATIONS: list[tuple[str, str]] = [("export", "bulk scoring from a Bulk Data $export")]
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass
class Check:
    """One line of the report."""
    area: str
    item: str
    ok: bool
    required: bool
    detail: str = ""


@dataclass
class SiteReport:
    url: str
    fhir_version: str | None = None
    software: str | None = None
    checks: list[Check] = field(default_factory=list)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    sampled: int = 0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.required)

    def add(self, area: str, item: str, ok: bool, required: bool = True, detail: str = "") -> None:
        self.checks.append(Check(area, item, ok, required, detail))

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "fhirVersion": self.fhir_version,
                "software": self.software, "checks": [asdict(c) for c in self.checks],
                "observationsSampled": self.sampled, "codes": self.codes}


def scope_covers(granted: str, needed: str) -> bool:
    """Does a scope the server offers cover one we ask for? SMART v1 (read/write) and v2 (cruds)."""
    def parse(scope: str) -> tuple[str, str, str] | None:
        context, _, rest = scope.partition("/")
        rtype, _, perms = rest.partition(".")
        if not context or not rtype or not perms:
            return None
        perms = perms.split("?", 1)[0]
        return context, rtype, _V1.get(perms, perms)
    g, n = parse(granted), parse(needed)
    if g is None or n is None or g[0] != n[0]:
        return False
    return g[1] in ("*", n[1]) and set(n[2]) <= set(g[2])


def _resource(capability: dict[str, Any], rtype: str) -> dict[str, Any] | None:
    for rest in capability.get("rest") or []:
        if rest.get("mode", "server") != "server":
            continue
        for resource in rest.get("resource") or []:
            if resource.get("type") == rtype:
                return resource
    return None


def check_capabilities(report: SiteReport, capability: dict[str, Any]) -> None:
    """Resources, interactions, search parameters and operations fhir_ai uses."""
    report.fhir_version = capability.get("fhirVersion")
    report.software = " ".join(filter(None, [(capability.get("software") or {}).get("name"),
                                             (capability.get("software") or {}).get("version")]))
    report.add("fhir", "FHIR R4 (4.0.x)", str(report.fhir_version or "").startswith("4.0"),
               detail=f"fhirVersion {report.fhir_version}")
    for rtype, interaction, params, why, required in NEEDS:
        resource = _resource(capability, rtype)
        interactions = {i.get("code") for i in (resource or {}).get("interaction") or []}
        offered = {p.get("name") for p in (resource or {}).get("searchParam") or []}
        missing = [p for p in params if p not in offered]
        ok = resource is not None and interaction in interactions and not missing
        detail = why
        if resource is None:
            detail += f"; {rtype} not in the CapabilityStatement"
        elif interaction not in interactions:
            detail += f"; interaction {interaction} not offered"
        if missing:
            detail += "; missing search parameters: " + ", ".join(missing)
        label = f"{rtype} {interaction}" + (f" ({', '.join(params)})" if params else "")
        report.add("rest", label, ok, required, detail)
        if rtype == "RiskAssessment" and interaction == "update" and resource is not None:
            # PUT to an id the server has not seen must create it (update-as-create).
            report.add("rest", "RiskAssessment update creates (updateCreate)",
                       resource.get("updateCreate") is True, True, "write-back uses our own ids")
    names = {op.get("name", "").lstrip("$") for rest in capability.get("rest") or []
             for op in (rest.get("operation") or [])}
    for resource in (r for rest in capability.get("rest") or [] for r in rest.get("resource") or []):
        names |= {op.get("name", "").lstrip("$") for op in resource.get("operation") or []}
    for name, why in OPERATIONS:
        report.add("operation", f"${name}", name in names, False, why)
    report.add("rest", "batch", declares_batch(capability), False,
               "a patient's record in one request per assessment (FHIR_AI_SOURCE_BATCH=auto); without it, three")


def check_smart(report: SiteReport, config: dict[str, Any] | None, settings: Settings) -> None:
    """Token endpoint, client_credentials with private_key_jwt, our algorithm and our scopes."""
    required = bool(settings.smart_client_id)  # without a SMART client these are informational
    if config is None:
        report.add("smart", ".well-known/smart-configuration", False, required,
                   "not offered" + ("" if required else "; fhir_ai uses a static token or none"))
        return
    report.add("smart", "token_endpoint", bool(config.get("token_endpoint")), required,
               str(config.get("token_endpoint") or "missing"))
    grants = config.get("grant_types_supported") or []
    report.add("smart", "grant client_credentials", "client_credentials" in grants, required,
               ", ".join(grants) or "grant_types_supported missing")
    methods = config.get("token_endpoint_auth_methods_supported") or []
    report.add("smart", "private_key_jwt", "private_key_jwt" in methods, required,
               ", ".join(methods) or "token_endpoint_auth_methods_supported missing")
    algs = config.get("token_endpoint_auth_signing_alg_values_supported") or []
    for alg in smart.ALGORITHMS:
        report.add("smart", f"signing {alg}", alg in algs, required and alg == settings.smart_alg,
                   ", ".join(algs) or "token_endpoint_auth_signing_alg_values_supported missing")
    offered = config.get("scopes_supported")
    for scope in settings.smart_scopes.split():
        if offered is None:  # optional in the specification: unknown, not missing
            report.add("smart", f"scope {scope}", True, False, "scopes_supported not published")
            continue
        covering = [s for s in offered if scope_covers(s, scope)]
        report.add("smart", f"scope {scope}", bool(covering), required,
                   f"covered by {covering[0]}" if covering else "no offered scope covers it")


def observed_codes(observations: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(system, code) of every Observation code and component code."""
    found: set[tuple[str, str]] = set()
    for obs in observations:
        for concept in [obs.get("code") or {}] + [c.get("code") or {} for c in obs.get("component") or []]:
            for coding in concept.get("coding") or []:
                if coding.get("code"):
                    found.add((coding.get("system") or "", coding["code"]))
    return found


def check_codes(report: SiteReport, observations: list[dict[str, Any]], mappings_dir: str) -> None:
    """How many of each mapping's codes occur in the sample (no values are kept or printed)."""
    seen = observed_codes(observations)
    seen_any_system = {code for _, code in seen}
    for model_id, mapping in sorted(load_directory(mappings_dir).items()):
        inputs: dict[str, bool] = {}
        for spec in mapping.input_list:
            if not spec.is_observation:   # age, sex ...: read from Patient / Encounter
                continue
            codes = (*spec.codes, *spec.panel_codes)
            inputs[spec.name] = any((s, c) in seen if s else c in seen_any_system for s, c in codes)
        wanted = mapping.query_codes()
        hits = [f"{s}|{c}" for s, c in wanted if ((s, c) in seen if s else c in seen_any_system)]
        report.codes[model_id] = {
            "codes": len(wanted), "codesSeen": len(hits), "seen": hits,
            "inputs": len(inputs), "inputsSeen": sum(inputs.values()),
            "inputsNotSeen": sorted(k for k, v in inputs.items() if not v)}


def check_site(url: str, settings: Settings, *, sample: int = 200,
               session: requests.Session | None = None) -> SiteReport:
    """Run every check against ``url``; network failures become failed checks, not exceptions."""
    url = url.rstrip("/")
    report = SiteReport(url)
    session = session or requests.Session()
    config = _smart_configuration(url, session, report)
    check_smart(report, config, settings)
    try:
        auth = smart.auth_from_settings(settings, url)
    except FhirAiError as exc:
        report.add("smart", "client configuration", False, True, exc.message)
        auth = None
    client = FhirClient(url, token=None if auth else settings.source_token, retries=1,
                        timeout=settings.source_timeout, session=session, auth=auth)
    if auth is not None:
        try:
            auth.headers()
            report.add("smart", "token obtained", True, True, f"client {settings.smart_client_id}")
        except FhirAiError as exc:
            report.add("smart", "token obtained", False, True, exc.message)
    batch = False
    try:
        capability = client.get("metadata")
        check_capabilities(report, capability)
        batch = declares_batch(capability)
    except FhirAiError as exc:
        report.add("fhir", "CapabilityStatement", False, True, exc.message)
    observations: list[dict[str, Any]] = []
    try:
        for obs in client.search("Observation", [("_count", min(sample, 200))]):
            observations.append(obs)
            if len(observations) >= sample:
                break
        report.add("data", "Observation sample", bool(observations), False,
                   f"{len(observations)} Observations read")
    except FhirAiError as exc:
        report.add("data", "Observation sample", False, False, exc.message)
    report.sampled = len(observations)
    try:
        check_codes(report, observations, settings.mappings_dir)
    except FhirAiError as exc:
        report.add("data", "mappings", False, True, exc.message)
    if batch:
        check_batch(report, client, observations, settings.mappings_dir)
    return report


def check_batch(report: SiteReport, client: FhirClient, observations: list[dict[str, Any]],
                mappings_dir: str) -> None:
    """A server that lists batch: does a batch find what the separate requests find, for a patient of the
    sample (every mapping's codes, no time window)? Only counts are reported, no ids."""
    item = "batch answers as the separate requests do"
    patient = next((p for p in (patient_of_reference((o.get("subject") or {}).get("reference"))
                                for o in observations) if p), None)
    if patient is None:
        report.add("rest", item, False, False, "not tried: no sampled Observation names a Patient")
        return
    try:
        codes = sorted({code for mapping in load_directory(mappings_dir).values() for code in mapping.query_codes()})
        same, detail = ServerSource(client, batch=True, check=False).compare_batch(patient, codes)
    except FhirAiError as exc:
        same, detail = False, f"not compared: {exc.message}"
    report.add("rest", item, same, False, detail)


def _smart_configuration(url: str, session: requests.Session,
                         report: SiteReport) -> dict[str, Any] | None:
    try:
        response = session.get(f"{url}/.well-known/smart-configuration",
                               headers={"Accept": "application/json"}, timeout=10)
    except requests.RequestException as exc:
        log.warning("smart-configuration of %s: %s", url, type(exc).__name__)
        return None
    if response.status_code != 200:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def render(report: SiteReport) -> str:
    """The report for a terminal: one line per check, then the codes."""
    lines = [f"site {report.url}  (FHIR {report.fhir_version or '?'}"
             f"{', ' + report.software if report.software else ''})"]
    for c in report.checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        lines.append(f"  {mark} {c.area:<9} {c.item:<48} {c.detail}")
    lines.append(f"  codes in a sample of {report.sampled} Observations:")
    for model_id, codes in report.codes.items():
        missing = ", ".join(codes["inputsNotSeen"]) or "none"
        lines.append(f"    {model_id}: {codes['codesSeen']} of {codes['codes']} codes seen; "
                     f"{codes['inputsSeen']} of {codes['inputs']} inputs; not seen: {missing}")
    lines.append("result: " + ("ready" if report.ok else "NOT ready (see FAIL lines)"))
    return "\n".join(lines)


__all__ = ["SiteReport", "Check", "check_site", "render", "scope_covers", "observed_codes"]
