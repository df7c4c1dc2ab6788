"""One hook call's data: prefetch when the EHR sent it, the EHR's fhirServer for what it did not.

CDS Hooks 2.0: a missing key was not attempted (fetch it); ``null`` means there is no such data; an
OperationOutcome means the EHR failed (fetch it ourselves, or 412 when we cannot).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable
from urllib.parse import urlsplit

from ..errors import (BadRequest, ConfigurationError, FhirAiError, UpstreamError, UpstreamNotFound)
from ..fhir.client import FhirClient, outcome_text
from ..fhir.sources import ServerSource
from ..mapping import Mapping
from .patient_data import RecordChecker
from .services import ENCOUNTER_KEY, PATIENT_KEY, Service, observation_chunks, observation_keys

log = logging.getLogger(__name__)

_MISSING = object()
WHAT = {PATIENT_KEY: "Patient", ENCOUNTER_KEY: "Encounter"}

# The clinician waits for the hook's answer: temporary failures (connection reset, timeout, 408, 429,
# 5xx) are retried a little, quickly, and every attempt and wait fits in the hook's time budget
# (cds_fetch_timeout for all fetches of one call); see FhirClient's deadline.
RETRIES = 2
BACKOFF = 0.25          # s: 0.25, then 0.5, unless the server's Retry-After asks for longer
# Looked up when each client is made, so that tests can patch out the waiting and the clock.
sleep: Callable[[float], None] = time.sleep
clock: Callable[[], float] = time.monotonic


class PreconditionFailed(FhirAiError):
    """CDS Hooks: required FHIR data could not be obtained, by prefetch or from the EHR's server."""
    status = 412
    code = "incomplete"


@dataclass
class Gathered:
    """The checked resources of one patient and notes (i18n key, values) for the card."""
    resources: list[dict[str, Any]] = field(default_factory=list)
    notes: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    encounter_id: str | None = None


ClientFactory = Callable[[str, str | None], FhirClient]


class Gatherer:
    """Resolves one hook request's prefetch against the service's templates."""

    def __init__(self, service: Service, mapping: Mapping, hook_request: dict[str, Any], *,
                 as_of: datetime, timeout: float, allowed_servers: list[str] | None,
                 client_factory: ClientFactory | None = None) -> None:
        self.service = service
        self.mapping = mapping
        self.request = hook_request
        self.as_of = as_of
        self.timeout = timeout
        self.allowed_servers = allowed_servers
        self.client_factory = client_factory or self._client
        context = hook_request["context"]
        self.patient_id: str = context["patientId"]
        self.encounter_id: str | None = context.get("encounterId")
        self.checker = RecordChecker(self.patient_id)
        self.out = Gathered(encounter_id=self.encounter_id)
        self.deadline = clock() + timeout       # for every fetch of this call together
        self._source: ServerSource | None = None
        self._get_only_known = False

    def gather(self) -> Gathered:
        prefetch = self.request.get("prefetch")
        if prefetch is None:
            prefetch = {}
        if not isinstance(prefetch, dict):
            raise BadRequest("prefetch must be an object", expression="prefetch")
        try:
            self._patient(prefetch.get(PATIENT_KEY, _MISSING))
            self._encounter(prefetch.get(ENCOUNTER_KEY, _MISSING))
            for key, codes in zip(observation_keys(self.mapping), observation_chunks(self.mapping)):
                self._observations(key, codes, prefetch.get(key, _MISSING))
        finally:
            if self._source is not None:
                if not self._source.search_by_post and not self._get_only_known:
                    GET_ONLY.add(self._source.client.base_url)     # learnt in this call
                self._source.close()
        self.out.resources = self.checker.data.resources
        return self.out

    # -- one prefetch key each -------------------------------------------------------------------
    def _patient(self, value: Any) -> None:
        path = f"prefetch.{PATIENT_KEY}"
        if value is None:
            raise PreconditionFailed(f"the EHR has no Patient/{self.patient_id} (prefetch {PATIENT_KEY} is null); "
                                     "the patient is needed to assess", expression=path)
        if value is _MISSING or _is_outcome(value):
            self._fetch_note(PATIENT_KEY, value)
            try:
                value = self._fetch(PATIENT_KEY, lambda s: s.patient(self.patient_id))
            except UpstreamNotFound as exc:
                raise PreconditionFailed(f"Patient/{self.patient_id} is not on the EHR's FHIR server",
                                         expression=path) from exc
            path = "fhirServer:Patient"
        self.checker.add(value, path)

    def _encounter(self, value: Any) -> None:
        """The hook's encounter: a read of context.encounterId (encounter-start) or a search of the patient's
        encounters (patient-view, whose encounterId is optional); either shape is taken whatever the hook."""
        path = f"prefetch.{ENCOUNTER_KEY}"
        failed = _failed_entries(value) if isinstance(value, dict) and value.get("resourceType") == "Bundle" else []
        if failed:
            value = failed[0]                      # the EHR's search failed in part: fetch it whole
        if value is None:
            if self.service.requires_encounter():
                raise PreconditionFailed(f"the EHR has no Encounter/{self.encounter_id} (prefetch "
                                         f"{ENCOUNTER_KEY} is null); {self.service.hook} needs it", expression=path)
            self.out.notes.append(("note.prefetch_null", {"what": "Encounter"}))
        elif value is _MISSING or _is_outcome(value):
            self._fetch_note(ENCOUNTER_KEY, value)
            if self.encounter_id:
                self._fetch_encounter(path)
            else:       # as $assess without a pinned encounter: every encounter, the current one chosen later
                found = self._fetch(ENCOUNTER_KEY, lambda s: s.encounters(self.patient_id))
                for i, encounter in enumerate(found):
                    self.checker.add(encounter, f"fhirServer:Encounter[{i}]")
            return
        elif isinstance(value, dict) and value.get("resourceType") == "Bundle":
            for i, resource in _entries(value, path):
                self.checker.add(resource, f"{path}.entry[{i}].resource")
            next_url = _next_link(value)
            if next_url:
                self._rest_of_pages(ENCOUNTER_KEY, next_url)
        else:
            if isinstance(value, dict) and self.encounter_id and value.get("resourceType") == "Encounter" \
                    and value.get("id") != self.encounter_id:
                raise BadRequest(f"prefetch {ENCOUNTER_KEY} is Encounter/{value.get('id')}, but context.encounterId "
                                 f"is {self.encounter_id}", expression=f"{path}.id")
            self.checker.add(value, path)
        if self.encounter_id and not any(r.get("resourceType") == "Encounter" and r.get("id") == self.encounter_id
                                         for r in self.checker.data.resources):
            # The hook names an encounter the prefetch does not hold: read it rather than assess another one.
            if not self.request.get("fhirServer"):
                raise PreconditionFailed(f"context.encounterId is {self.encounter_id}, which prefetch "
                                         f"{ENCOUNTER_KEY} does not hold, and the request has no fhirServer to "
                                         "read it from", expression=path)
            self.out.notes.append(("note.fetched", {"what": "Encounter"}))
            self._fetch_encounter(path)

    def _fetch_encounter(self, path: str) -> None:
        try:
            found = self._fetch(ENCOUNTER_KEY, lambda s: s.client.get(f"Encounter/{self.encounter_id}"))
        except UpstreamNotFound as exc:
            raise PreconditionFailed(f"Encounter/{self.encounter_id} is not on the EHR's FHIR server",
                                     expression=path) from exc
        self.checker.add(found, "fhirServer:Encounter")

    def _observations(self, key: str, codes: list[tuple[str, str]], value: Any) -> None:
        path = f"prefetch.{key}"
        if value is None:
            self.out.notes.append(("note.prefetch_null", {"what": "Observation"}))
            return
        if isinstance(value, dict) and value.get("resourceType") == "Bundle" and _failed_entries(value):
            value = _failed_entries(value)[0]      # the EHR's search failed in part: fetch it whole
        if value is _MISSING or _is_outcome(value):
            self._fetch_note(key, value)
            lookback = self.mapping.longest_lookback()
            since = None if lookback is None else self.as_of - timedelta(seconds=lookback)
            found = self._fetch(key, lambda s: s.observations(self.patient_id, codes, since=since, until=self.as_of))
            for i, observation in enumerate(found):
                self.checker.add(observation, f"fhirServer:{key}[{i}]")
            return
        if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
            raise BadRequest(f"prefetch {key} must be a searchset Bundle, null or an OperationOutcome",
                             expression=f"{path}.resourceType")
        for i, resource in _entries(value, path):
            self.checker.add(resource, f"{path}.entry[{i}].resource")
        next_url = _next_link(value)
        if next_url:
            # The client paginated its prefetch (allowed by the spec): read the remaining pages ourselves.
            self._rest_of_pages(key, next_url)

    def _rest_of_pages(self, key: str, url: str) -> None:
        def pages(source: ServerSource) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            link: str | None = url
            seen: set[str] = set()
            while link and link not in seen:
                seen.add(link)
                bundle = source.client.get(link)
                found.extend(r for _, r in _entries(bundle, "fhirServer:next"))
                link = next((x.get("url") for x in bundle.get("link") or [] if x.get("relation") == "next"), None)
            return found
        for i, resource in enumerate(self._fetch(key, pages)):
            self.checker.add(resource, f"fhirServer:{key}(next pages)[{i}]")

    # -- the EHR's FHIR server ---------------------------------------------------------------------
    def _fetch_note(self, key: str, value: Any) -> None:
        if value is _MISSING:
            self.out.notes.append(("note.fetched", {"what": _what(key)}))
        else:
            error = outcome_text(value) or "OperationOutcome"
            log.info("prefetch %s failed at the EHR; fetching it", key)
            self.out.notes.append(("note.prefetch_error", {"what": _what(key), "error": error[:200]}))

    def _fetch(self, key: str, call: Callable[[ServerSource], Any]) -> Any:
        source = self._server(key)
        try:
            return call(source)
        except UpstreamNotFound:
            raise
        except UpstreamError as exc:
            raise PreconditionFailed(f"cannot obtain {_what(key)} from the EHR's FHIR server: {exc.message}",
                                     expression=f"prefetch.{key}") from exc

    def _server(self, key: str) -> ServerSource:
        if self._source is not None:
            return self._source
        server = self.request.get("fhirServer")
        if not server:
            raise PreconditionFailed(f"prefetch {key} was not provided (or failed) and the request has no "
                                     "fhirServer to fetch it from", expression=f"prefetch.{key}")
        if _origin_and_path(server) is None:
            raise BadRequest("fhirServer is not a plain http(s) FHIR base URL (no user information, query or "
                             f"fragment): {server!r}", expression="fhirServer")
        # None: any server (cds_fhir_servers '*'); an empty list: none (no server configured).
        if self.allowed_servers is not None and not any(server_allowed(server, p) for p in self.allowed_servers):
            raise PreconditionFailed(f"prefetch {key} is missing and fhirServer {server} is not one this service "
                                     "may call (cds_fhir_servers)", expression="fhirServer")
        auth = self.request.get("fhirAuthorization") or {}
        try:
            client = self.client_factory(server, auth.get("access_token"))
        except ConfigurationError as exc:
            raise BadRequest(f"fhirServer is not an http(s) FHIR base URL: {server!r}",
                             expression="fhirServer") from exc
        self._source = ServerSource(client)
        if GET_ONLY.has(client.base_url):
            self._source.search_by_post = False
            self._get_only_known = True
        return self._source

    def _client(self, server: str, token: str | None) -> FhirClient:
        # A Retry-After longer than the time left fails the fetch at once (412): the clinician is waiting.
        return FhirClient(server, token=token, timeout=self.timeout, retries=RETRIES, backoff=BACKOFF,
                          retry_after_cap=self.timeout, deadline=self.deadline, sleep=sleep, clock=clock)


def _origin_and_path(url: str) -> tuple[str, str, int | None, str] | None:
    """(scheme, host, port, path) of a plain http(s) URL; None for anything else: user information
    ('https://ehr.example@elsewhere'), backslashes, a query or fragment, no host, a bad port."""
    if not isinstance(url, str) or "\\" in url or any(ord(c) < 33 for c in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or "@" in parts.netloc \
            or parts.query or parts.fragment:
        return None
    scheme = parts.scheme.lower()
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80), parts.path.rstrip("/")


def server_allowed(server: Any, allowed: str) -> bool:
    """Whether the hook's ``fhirServer`` is the configured base URL ``allowed`` or below it: the same scheme,
    host and port, and its path the same or further segments of it ('https://ehr.example/fhir' allows
    'https://ehr.example/fhir/r4', not 'https://ehr.example/fhir-test' nor 'https://ehr.example.attacker.test')."""
    mine, theirs = _origin_and_path(allowed), _origin_and_path(server)
    if mine is None or theirs is None or mine[:3] != theirs[:3]:
        return False
    return theirs[3] == mine[3] or theirs[3].startswith(mine[3] + "/")


class ServerMemory:
    """fhirServer base URLs that refused a search by POST _search, kept across hook calls.

    Each call has its own ServerSource, whose memory of the refusal would die with it: without this, such a
    server would cost one refused POST per call. Bounded (least recently added dropped first) and
    forgotten after ``ttl`` seconds, so that a server that has learnt POST _search is asked again.
    Holds base URLs without user info, query or fragment: no token, no patient data.
    """

    def __init__(self, size: int = 256, ttl: float = 3600.0) -> None:
        self.size = size
        self.ttl = ttl
        self._added: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, base_url: str) -> None:
        key = _server_key(base_url)
        with self._lock:
            self._added.pop(key, None)
            self._added[key] = clock()
            while len(self._added) > self.size:
                self._added.popitem(last=False)

    def has(self, base_url: str) -> bool:
        key = _server_key(base_url)
        with self._lock:
            added = self._added.get(key)
            if added is not None and clock() - added >= self.ttl:
                del self._added[key]
                added = None
        return added is not None

    def clear(self) -> None:
        with self._lock:
            self._added.clear()


GET_ONLY = ServerMemory()      # servers to search by GET (the per-process memory of POST refusals)


def _server_key(base_url: str) -> str:
    parts = urlsplit(base_url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return f"{parts.scheme.lower()}://{host}{parts.path.rstrip('/')}"


def _what(key: str) -> str:
    return WHAT.get(key, f"Observations ({key})")


def _is_outcome(value: Any) -> bool:
    return isinstance(value, dict) and value.get("resourceType") == "OperationOutcome"


def _failed_entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """OperationOutcomes inside a prefetch Bundle that report an error (not mere search remarks)."""
    out = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if _is_outcome(resource) and any(isinstance(i, dict) and i.get("severity") in ("error", "fatal")
                                         for i in resource.get("issue") or []):
            out.append(resource)
    return out


def _next_link(bundle: dict[str, Any]) -> str | None:
    links = bundle.get("link") or []
    return next((link.get("url") for link in links if isinstance(link, dict) and link.get("relation") == "next"),
                None) if isinstance(links, list) else None


def _entries(bundle: dict[str, Any], path: str) -> list[tuple[int, dict[str, Any]]]:
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be a list", expression=f"{path}.entry")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BadRequest("a Bundle entry must be an object", expression=f"{path}.entry[{i}]")
        resource = entry.get("resource")
        if (entry.get("search") or {}).get("mode") == "outcome" or _is_outcome(resource):
            continue        # the server's remarks about the search, not data
        if resource is not None:
            out.append((i, resource))
    return out
