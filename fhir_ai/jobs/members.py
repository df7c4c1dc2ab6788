"""Who a job assesses: a Group's active Patient members, or everyone in an active inpatient/ED Encounter."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import orjson

from ..errors import BadRequest, NotFound, UpstreamNotFound
from ..fhir.sources import FolderSource, ServerSource, Source, patient_of_reference

log = logging.getLogger(__name__)

# v3 ActCode encounter classes that count as "in hospital": inpatient (acute, non-acute), emergency, observation.
ACTIVE_CLASSES = ("IMP", "ACUTE", "NONAC", "EMER", "OBSENC")


def _patient(reference: Any, base_url: str | None = None) -> str | None:
    """The Patient id a reference names ('Patient/p1', versioned, or an absolute URL on ``base_url``, the
    source's own server); None for anything else (a Patient on another server is another person)."""
    if not isinstance(reference, str):
        return None
    if "://" in reference and not (base_url and reference.startswith(base_url.rstrip("/") + "/")):
        return None
    return patient_of_reference(reference)


def group_patients(group: dict[str, Any], base_url: str | None = None) -> list[str]:
    """Patient ids of a Group's active members (``inactive`` ones are left out), in member order."""
    if group.get("resourceType") != "Group":
        raise BadRequest(f"expected a Group, got {group.get('resourceType')!r}")
    out: dict[str, None] = {}
    others = 0
    for member in group.get("member") or []:
        if not isinstance(member, dict) or member.get("inactive") is True:
            continue
        entity = member.get("entity")
        patient = _patient(entity.get("reference") if isinstance(entity, dict) else None, base_url)
        if patient:
            out[patient] = None
        else:
            others += 1
    if others:
        log.info("Group/%s: %d member(s) are not Patients; skipped", group.get("id"), others)
    return list(out)


def group_members(source: Source, group_id: str) -> list[str]:
    """Read Group/{id} at the source (server, or a Group resource in a folder source)."""
    if isinstance(source, ServerSource):
        try:
            group = source.client.get(f"Group/{group_id}")
        except UpstreamNotFound as exc:
            raise NotFound(f"Group/{group_id} is not known to the hospital's FHIR server") from exc
        return group_patients(group, source.client.base_url)
    if isinstance(source, FolderSource):
        for group in _folder_groups(source.path):
            if group.get("id") == group_id:
                return group_patients(group)
        raise NotFound(f"Group/{group_id} is not in the folder source")
    raise BadRequest("this source cannot list Groups")


def active(encounter: dict[str, Any]) -> bool:
    codes = {encounter.get("class", {}).get("code")} if isinstance(encounter.get("class"), dict) else set()
    return encounter.get("status") == "in-progress" and bool(codes & set(ACTIVE_CLASSES))


def active_patients(source: Source) -> list[str]:
    """Everyone with an in-progress inpatient/ED Encounter at the source, sorted."""
    found: set[str] = set()
    if isinstance(source, ServerSource):
        params = [("status", "in-progress"), ("class", ",".join(ACTIVE_CLASSES)), ("_count", 200)]
        for encounter in source.client.search("Encounter", params):
            # Filter again: a server may ignore a search parameter it does not support.
            subject = encounter.get("subject")
            patient = _patient(subject.get("reference") if isinstance(subject, dict) else None,
                               source.client.base_url)
            if active(encounter) and patient:
                found.add(patient)
    elif isinstance(source, FolderSource):
        for patient in source.patient_ids():
            if any(active(e) for e in source.encounters(patient)):
                found.add(patient)
    else:
        raise BadRequest("this source cannot list encounters")
    return sorted(found)


def _folder_groups(folder: Path) -> Iterable[dict[str, Any]]:
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not path.name.startswith("Group"):
            continue
        if path.name.endswith(".ndjson"):
            for line in path.read_bytes().splitlines():
                if line.strip():
                    yield orjson.loads(line)
        elif path.name.endswith(".json"):
            yield orjson.loads(path.read_bytes())
