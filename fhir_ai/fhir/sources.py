"""Where patient data comes from: a hospital FHIR server or a folder of NDJSON/Bundles."""
from __future__ import annotations

import abc
import functools
import gzip
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import orjson

from ..errors import (BadRequest, ConfigurationError, NotSupported, UpstreamError, UpstreamNotFound,
                      UpstreamTimeout)
from .ids import usable_id
from .client import QUERY_SAFE, Auth, FhirClient, SearchPostRefused, encode_params
from .times import MAX_TIME, MIN_TIME, datetime_range, format_datetime

log = logging.getLogger(__name__)

Codes = Sequence[tuple[str, str]]
MAX_URL = 1800  # stay under the ~2,000 characters many proxies and servers accept
# What a server that does not take a batch answers one (POST [base] with a Bundle of GETs): a bad request,
# forbidden (a gateway that lets only reads through), not found or not allowed (no route for POST [base]),
# the media type refused, unprocessable, not implemented.
BATCH_REFUSED = frozenset({400, 403, 404, 405, 415, 422, 501})
BATCH_PROBE_RETRY = 600     # seconds before a CapabilityStatement that could not be read is asked for again
BATCH_OFF_FOR = 3600        # seconds a refused or failing batch is not tried (and a probe's answer holds)
BATCH_FAILURES = 3          # failed batches in a row (the separate requests then working) that pause batching
BATCH_CHECKS = 2            # batch answers in a row unlike the separate requests' that pause batching


@dataclass
class _Declined:
    """Why a batch gave no record (never the server's words: they may name a patient), and what kind of no:
    'refused' (the server does not take it), 'failed' (5xx, 429, timeout: the server's trouble) or 'half'
    (an entry not answered as asked)."""
    why: str
    kind: str
    retry_after: float | None = None


def _status_of(error: UpstreamError) -> str:
    """An upstream failure in a few words, without the server's text."""
    if isinstance(error, UpstreamTimeout):
        return "no answer in time"
    return f"HTTP {error.upstream_status}" if error.upstream_status else "no answer (connection failed)"


def _check_id(patient_id: str) -> str:
    if not usable_id(patient_id):
        raise BadRequest("not a FHIR id (1-64 of A-Z a-z 0-9 - ., not dots only)", expression="patient")
    return patient_id


def _check_aware(dt: datetime | None, name: str) -> datetime | None:
    if dt is not None and dt.tzinfo is None:
        raise ValueError(f"{name} must be time-zone aware")
    return dt


class Source(abc.ABC):
    """Where patient data comes from (a hospital FHIR server or a folder)."""

    read_only: bool

    @abc.abstractmethod
    def patient(self, patient_id: str) -> dict[str, Any]:
        """The Patient resource; UpstreamNotFound if unknown."""

    @abc.abstractmethod
    def encounters(self, patient_id: str) -> list[dict[str, Any]]:
        """Every Encounter of the patient."""

    @abc.abstractmethod
    def observations(self, patient_id: str, codes: Codes | None = None,
                     since: datetime | None = None,
                     until: datetime | None = None) -> list[dict[str, Any]]:
        """The patient's Observations with any of ``codes`` ((system, code); an empty system
        matches any) whose effective time overlaps [since, until]; None means no filter."""

    @abc.abstractmethod
    def write(self, resource: dict[str, Any], *, retries: int | None = None) -> dict[str, Any]:
        """Create or update the resource by id (idempotent); ``retries`` overrides the client's."""

    def record(self, patient_id: str, codes: Codes, since: datetime | None = None,
               until: datetime | None = None) -> list[dict[str, Any]]:
        """What one assessment reads: [Patient, *its Encounters, *its Observations with any of ``codes``
        in [since, until]] (none when ``codes`` is empty); errors as patient() and the searches raise them."""
        patient = self.patient(patient_id)
        encounters = self.encounters(patient_id)
        observations = self.observations(patient_id, codes, since=since, until=until) if codes else []
        return [patient, *encounters, *observations]

    def close(self) -> None:
        """Release connections; the default has nothing to release."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _escape(value: str) -> str:
    """Escape FHIR search separators (https://hl7.org/fhir/R4/search.html#escaping)."""
    return re.sub(r"([\\,|$])", r"\\\1", value)


def code_token(system: str, code: str) -> str:
    """One token search value: 'system|code', or just 'code' (any system) if system is empty."""
    return f"{_escape(system)}|{_escape(code)}" if system else _escape(code)


class ServerSource(Source):
    """A hospital FHIR server, searched with standard R4 parameters.

    A search with a code list (long) goes as one ``POST [type]/_search`` with a form body; a server
    that does not take it (SearchPostRefused) is searched by GET from then on, the code list split
    so that no URL passes MAX_URL.
    """

    read_only = False

    def __init__(self, client: FhirClient, *, batch: bool | None = False, check: bool = True) -> None:
        """``batch``: read a patient's record (record()) in one batch, POST [base] with a Bundle of GETs,
        instead of a request per resource type: True, False, or None to follow the server's
        CapabilityStatement (asked once, on first use). ``check``: compare the first batch answers (after
        each probe or pause) with the separate requests' (see record())."""
        self.client = client
        self.batch = batch                        # now: True, False, or None (auto, not known yet)
        self._batch_mode = batch                  # as configured: what ``batch`` goes back to after a pause
        self._batch_lock = threading.Lock()       # one probe at a time
        self._batch_state = threading.Lock()      # pausing and resuming
        self._clock = time.monotonic
        self._batch_probe_after = 0.0             # time.monotonic() before which the probe is not asked again
        self._batch_off_until = 0.0               # time.monotonic() until which batching is paused (0: not paused)
        self._batch_failures = 0                  # failed batches in a row
        self._check = check
        self._unchecked = check                   # the next batch answer is compared with separate requests'
        self._differed = 0                        # batch answers in a row unlike the separate requests'
        self.search_by_post = True    # until the server refuses a POST _search (then GET, remembered)
        # Set by a catch-up (subscriptions.py) that found the server cannot sort by _lastUpdated: why, how
        # many Observations its pages held, when (time.monotonic()); later catch-ups, for an hour, read in
        # counted windows straight away.
        self.unsorted: tuple[str, int, float] | None = None
        self.was_unsorted = False                 # ever found so (an hour's finding expires; this does not)
        self.counts: bool | None = None           # whether it answered the last _summary=count with a total

    def patient(self, patient_id: str) -> dict[str, Any]:
        return self.client.get(f"Patient/{_check_id(patient_id)}")

    def encounters(self, patient_id: str) -> list[dict[str, Any]]:
        return _unique(self.client.search("Encounter", _encounter_params(patient_id)))

    def observations(self, patient_id: str, codes: Codes | None = None,
                     since: datetime | None = None,
                     until: datetime | None = None) -> list[dict[str, Any]]:
        params = _observation_params(patient_id, since, until)
        if codes is None:
            return _unique(self.client.search("Observation", params))
        if not codes:
            return []
        return self._search_codes("Observation", encode_params(params), tuple(codes))

    # -- a patient's record in one batch -------------------------------------------------------
    def record(self, patient_id: str, codes: Codes, since: datetime | None = None,
               until: datetime | None = None) -> list[dict[str, Any]]:
        """As Source.record; in one round trip where the server takes a batch (``batch``).

        The batch is an optimisation, never a new way to fail, and all or nothing: it is sent once (no
        retries), and unless every entry is answered as asked (this Patient, searchsets whose resources
        name no other patient), the record is read by the separate requests, with their retries, which
        report any error as they would without a batch. Learnt from it:
        - refused (BATCH_REFUSED, 401, an answer that is not a batch-response with an entry per request):
          batching pauses for BATCH_OFF_FOR seconds, once the separate requests have worked (an unknown or
          forbidden patient that made the server refuse the whole batch teaches nothing);
        - failed (5xx, 429, a timeout, an empty or cut answer): counted whatever the separate requests do,
          so an outage costs one extra attempt for BATCH_FAILURES assessments, then batching pauses; a
          Retry-After on it is waited for (up to the client's cap) before the separate requests;
        - half-answered (an entry with an error status, another patient, not a searchset): counted once
          the separate requests have worked; BATCH_FAILURES in a row pause batching.
        A server may also misread an entry's URL and answer every batch with well-formed but wrong searchsets
        (empty ones: a patient without data, a silent "no risk"). So the first batch answers (after each
        probe, and after a pause) are checked: the record is read by the separate requests too and theirs
        is used; the same resources (Observations among them, or Encounters when no codes are asked) mean the
        server's batches can be trusted until the next probe; BATCH_CHECKS answers in a row that differ pause
        batching as a refusal does (one differing answer may be data that changed between the two reads).
        """
        params = _observation_params(patient_id, since, until)     # checks the id and the dates
        if not patient_id.strip(".") or not self._batching():      # 'Patient/..' is no id to put in a URL
            return super().record(patient_id, codes, since, until)
        answer = self._batch_record(patient_id, codes, params)
        if not isinstance(answer, _Declined):
            self._batch_failures = 0
            if not self._unchecked:
                return answer
            record = super().record(patient_id, codes, since, until)   # raises as without a batch
            self._compare(answer, record, bool(codes))
            return record
        if answer.kind == "failed":
            self._declined(answer)
            if answer.retry_after:
                self.client.wait(answer.retry_after)
        record = super().record(patient_id, codes, since, until)    # raises as without a batch
        if answer.kind != "failed":
            self._declined(answer)
        return record

    def compare_batch(self, patient_id: str, codes: Codes) -> tuple[bool, str]:
        """Read ``patient_id``'s record (every time) by one batch and by the separate requests: (whether the
        batch found the same resources, what each found, in counts). For ``fhir-ai check-site``; learns
        nothing from it (batching is neither paused nor trusted); errors of the separate requests raise."""
        params = _observation_params(patient_id, None, None)
        batched = self._batch_record(patient_id, codes, params)
        separate = super().record(patient_id, codes)
        found = f"{sum(r.get('resourceType') == 'Observation' for r in separate)} Observations"
        if isinstance(batched, _Declined):
            return False, f"the batch gave no record ({batched.why}); the separate requests found {found}"
        if _keys(batched) != _keys(separate):
            return False, (f"the batch found {len(batched)} resources, the separate requests {len(separate)} "
                           f"({found}): set FHIR_AI_SOURCE_BATCH=false")
        return True, f"the same {len(separate)} resources ({found}) for a sampled patient"

    @property
    def batch_checked(self) -> bool:
        """Whether batch answers are used as they come (checked against the separate requests', or not to be)."""
        return not self._unchecked

    def _compare(self, batched: list[dict[str, Any]], separate: list[dict[str, Any]], codes: bool) -> None:
        """A checked batch answer (record()): trusted from now on, one more difference, or a pause."""
        same = _keys(batched) == _keys(separate)
        telling = any(r.get("resourceType") == ("Observation" if codes else "Encounter") for r in separate)
        with self._batch_state:
            if same:
                if telling and self._unchecked:
                    self._unchecked, self._differed = False, 0
                    log.info("%s: a batch answered as the separate requests did; batches are used",
                             self.client.base_url)
                return                                # nothing to tell by (no data): the next one is checked
            self._differed += 1
            if self._differed < BATCH_CHECKS:
                log.info("%s: a batch answered unlike the separate requests (data changed in between?); "
                         "the next one is checked too", self.client.base_url)
                return
            self._differed = 0
        self._declined(_Declined(f"{BATCH_CHECKS} answers in a row unlike the separate requests'", "refused"))

    def _batching(self) -> bool:
        now = self._clock()
        if self._batch_off_until:
            if now < self._batch_off_until:
                return False
            with self._batch_state:
                if self._batch_off_until and now >= self._batch_off_until:   # time to try again
                    self._batch_off_until, self._batch_failures = 0.0, 0
                    self.batch = self._batch_mode
                    self._unchecked = self._check
        if self._batch_mode is None and now >= self._batch_probe_after:
            self._probe_batch()
        return bool(self.batch) and not self._batch_off_until

    def _probe_batch(self) -> None:
        """``batch`` from the server's CapabilityStatement (rest.interaction 'batch'), asked again after
        BATCH_OFF_FOR; if it cannot be read now (timeout, 5xx), unknown (separate requests) until it is
        asked again after BATCH_PROBE_RETRY. One thread asks; the others read separately meanwhile."""
        if not self._batch_lock.acquire(blocking=False):
            return
        try:
            if self._clock() < self._batch_probe_after:
                return
            try:
                statement = self.client.get("metadata", retries=0)
            except UpstreamNotFound:
                statement = None                                      # no CapabilityStatement: no batch declared
            except UpstreamError as exc:
                if exc.temporary:
                    self._batch_probe_after = self._clock() + BATCH_PROBE_RETRY
                    log.info("%s: its CapabilityStatement could not be read (%s); a request per resource type "
                             "for each patient, asking again in %d s", self.client.base_url,
                             _status_of(exc), BATCH_PROBE_RETRY)
                    return
                statement = None                                      # refused (401, 403, ...): no batch
            self._batch_probe_after = self._clock() + BATCH_OFF_FOR
            self.batch = declares_batch(statement)
            if self.batch:
                with self._batch_state:
                    self._unchecked = self._check     # checked again after each probe (the server may change)
            log.info("%s: %s", self.client.base_url, "takes batches: a patient's record in one request per "
                     "assessment" if self.batch else "no batch interaction declared: a request per resource type")
        finally:
            self._batch_lock.release()

    def _batch_record(self, patient_id: str, codes: Codes,
                      params: list[tuple[str, Any]]) -> list[dict[str, Any]] | _Declined:
        """The record from one batch, or why the batch gave none (the caller reads separately)."""
        head = encode_params(params)
        urls = [f"Patient/{patient_id}", f"Encounter?{encode_params(_encounter_params(patient_id))}"]
        if codes:
            urls.append(f"Observation?{head}&code={_code_list_uri(tuple(codes))}")
        batch = {"resourceType": "Bundle", "type": "batch",
                 "entry": [{"request": {"method": "GET", "url": url}} for url in urls]}
        try:
            answer = self.client.post("", batch, retries=0, quiet=True)     # the separate requests come next
        except UpstreamNotFound:
            return _Declined("HTTP 404 or 410", "refused")
        except UpstreamError as exc:
            status = exc.upstream_status
            if status in BATCH_REFUSED or status == 401:
                return _Declined(f"HTTP {status}", "refused")
            if status is not None and 200 <= status < 300 and not exc.temporary:    # JSON but not a resource
                return _Declined(f"HTTP {status} with JSON that is not a Bundle", "refused")
            return _Declined(_status_of(exc), "failed", exc.retry_after)
        if not answer:
            return _Declined("an empty answer", "failed")
        entries = answer.get("entry") if (answer.get("resourceType") == "Bundle"
                                          and answer.get("type") == "batch-response") else None
        if (not isinstance(entries, list) or len(entries) != len(urls)
                or not all(entry.__class__ is dict for entry in entries)):
            return _Declined("an answer that is not a batch-response with an entry per request", "refused")
        patient = _answered(entries[0], "Patient")
        if patient is None:
            return _Declined("the Patient entry not answered with a Patient", "half")
        if patient.get("id") != patient_id:
            # Another patient's record (a cache in between that keys POST [base] by its URL?): none of it is used.
            return _Declined("an answer that holds another patient", "half")
        pages = [_answered(entry, "Bundle") for entry in entries[1:]]
        if not all(_searchset(page) for page in pages):
            return _Declined("a search entry not answered with a searchset", "half")
        try:
            found = [_read_on(self.client, resource_type, page)
                     for resource_type, page in zip(("Encounter", "Observation"), pages)]
        except UpstreamNotFound:
            return _Declined("a next page of a search in the batch not found", "half")
        except UpstreamError as exc:
            if exc.temporary:
                return _Declined(f"a next page of a search in the batch: {_status_of(exc)}", "failed",
                                 exc.retry_after)
            return _Declined("a next page of a search in the batch not read", "half")
        if any(matches is None for matches in found):
            # A server that caps a search inside a batch (HAPI's maximumSearchResultCountInTransaction) may
            # end it without a next link: its total says so, and the separate searches page to the end.
            return _Declined("a search in the batch ended before its total", "half")
        encounters = _unique(found[0])
        observations = _unique(found[1]) if codes else []
        if _names_another_patient(encounters, patient_id) or _names_another_patient(observations, patient_id):
            return _Declined("an answer that holds another patient", "half")
        return [patient, *encounters, *observations]

    def _declined(self, declined: _Declined) -> None:
        """A batch gave no record: learn from it (see record())."""
        with self._batch_state:
            if self._batch_off_until:
                return                                                # paused meanwhile by another thread
            why = declined.why
            if declined.kind != "refused":
                self._batch_failures += 1
                if self._batch_failures < BATCH_FAILURES:
                    log.info("%s: a batch gave no record (%s); read by separate requests", self.client.base_url,
                             why)
                    return
                why += f", {self._batch_failures} batches in a row"
            self.batch, self._batch_failures = False, 0
            self._batch_off_until = self._clock() + BATCH_OFF_FOR
        log.warning("%s: the FHIR server does not take a batch of reads (%s); a request per resource type "
                    "for the next %d s", self.client.base_url, why, BATCH_OFF_FOR)

    def _search_codes(self, resource_type: str, head: str,
                      codes: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
        """Search ``head`` (an encoded query) with 'code' any of ``codes``: by POST _search with every
        code in one form, or, where the server refuses that, by as many GETs as MAX_URL needs."""
        refused = None
        if self.search_by_post:
            try:
                return _unique(self.client.search(resource_type, f"{head}&code={_code_list(codes)}",
                                                  post=True))
            except SearchPostRefused as exc:
                refused = exc
        room = MAX_URL - len(f"{self.client.base_url}/{resource_type}?{head}&code=")
        found: list[dict[str, Any]] = []
        for chunk in _code_chunks(codes, room):
            found.extend(self.client.search(resource_type, f"{head}&code={chunk}"))
        if refused is not None and self.search_by_post:
            # Remembered only once the GET worked: a refusal that was the search's own fault (a 400
            # 'not-supported' parameter, an unknown type) fails the GET too, and is reported as such.
            self.search_by_post = False
            log.warning("%s: the FHIR server does not take a search by POST _search (HTTP %s); "
                        "searching by GET from now on", self.client.base_url, refused.upstream_status)
        return _unique(found)

    def write(self, resource: dict[str, Any], *, retries: int | None = None) -> dict[str, Any]:
        return self.client.put(resource, retries=retries)

    def close(self) -> None:
        self.client.close()


def _encounter_params(patient_id: str) -> list[tuple[str, Any]]:
    return [("patient", _check_id(patient_id)), ("_count", 100)]


def _observation_params(patient_id: str, since: datetime | None,
                        until: datetime | None) -> list[tuple[str, Any]]:
    params: list[tuple[str, Any]] = [("patient", _check_id(patient_id))]
    if _check_aware(since, "since"):
        params.append(("date", "ge" + format_datetime(since)))  # type: ignore[arg-type]
    if _check_aware(until, "until"):
        params.append(("date", "le" + format_datetime(until)))  # type: ignore[arg-type]
    params.append(("_count", 200))
    return params


def declares_batch(statement: Any) -> bool:
    """Whether a CapabilityStatement's server part lists the 'batch' interaction."""
    if not isinstance(statement, dict) or statement.get("resourceType") != "CapabilityStatement":
        return False
    rests = statement.get("rest")
    return any(isinstance(rest, dict) and rest.get("mode") == "server"
               and isinstance(rest.get("interaction"), list)
               and any(isinstance(item, dict) and item.get("code") == "batch" for item in rest["interaction"])
               for rest in (rests if isinstance(rests, list) else []))


def _answered(entry: dict[str, Any], resource_type: str) -> dict[str, Any] | None:
    """A batch-response entry's resource if its status is 2xx and it is a ``resource_type``, else None."""
    response = entry.get("response")
    status = response.get("status") if isinstance(response, dict) else None
    if not isinstance(status, str) or not status[:1] == "2" or not status[:3].isdigit():
        return None
    resource = entry.get("resource")
    if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
        return None
    return resource


def _names_another_patient(resources: list[dict[str, Any]], patient_id: str) -> bool:
    """Whether a resource's subject (or patient) is a plain reference to another Patient than ``patient_id``
    (a reference fhir_ai cannot resolve - a urn, a contained one - names no other patient)."""
    for resource in resources:
        subject = resource.get("subject") or resource.get("patient")
        reference = subject.get("reference") if isinstance(subject, dict) else None
        if isinstance(reference, str):
            match = _PATIENT_REF.search(reference)
            if match is not None and match[1] != patient_id:
                return True
    return False


def _keys(resources: list[dict[str, Any]]) -> set[tuple[Any, Any]]:
    return {(r.get("resourceType"), r.get("id")) for r in resources}


def _searchset(page: dict[str, Any] | None) -> bool:
    return page is not None and page.get("type") == "searchset"


def _read_on(client: FhirClient, resource_type: str, first: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every match of a search whose first page was answered in a batch, the next pages read by GET once
    each (no retries: the separate requests have theirs); None when the pages hold fewer distinct matches
    than the first page's ``total`` (a search cut short)."""
    matches = list(client.search(resource_type, first=first, retries=0))    # the batch is tried once
    total = first.get("total")
    if isinstance(total, int) and not isinstance(total, bool):
        # total counts matches: resources of the type searched for, each once (not included ones, not repeats)
        found = {r.get("id") for r in matches if r.get("resourceType") == resource_type}
        if total > len(found):
            return None
    return matches


@functools.lru_cache(maxsize=256)
def _code_tokens(codes: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """Each code as one encoded token search value (escaped and encoded once per code list)."""
    return tuple(quote_plus(code_token(system, code), safe=QUERY_SAFE) for system, code in codes)


@functools.lru_cache(maxsize=256)
def _code_list(codes: tuple[tuple[str, str], ...]) -> str:
    """Every code as one encoded, comma-joined 'code' value (any of them: FHIR's 'or')."""
    return ",".join(_code_tokens(codes))


@functools.lru_cache(maxsize=256)
def _code_list_uri(codes: tuple[tuple[str, str], ...]) -> str:
    """_code_list for a URL read as a URI, not as a form (a batch entry's request.url): space as %20, not '+'."""
    return ",".join(quote(code_token(system, code), safe=QUERY_SAFE) for system, code in codes)


@functools.lru_cache(maxsize=256)
def _code_chunks(codes: tuple[tuple[str, str], ...], room: int) -> tuple[str, ...]:
    """The codes as encoded, comma-joined 'code' values of at most ``room`` characters each.

    The same code lists are asked for on every request (one per mapping); ``room`` varies only with
    the length of the patient id and dates: each list is escaped and split once.
    """
    chunks: list[str] = []
    chunk: list[str] = []
    used = 0
    for token in _code_tokens(codes):
        if chunk and used + 1 + len(token) > room:  # 1: the ',' between tokens
            chunks.append(",".join(chunk))
            chunk, used = [], 0
        used += len(token) + (1 if chunk else 0)
        chunk.append(token)
    if chunk:
        chunks.append(",".join(chunk))
    return tuple(chunks)


def _unique(resources: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop repeats by id (split searches overlap; live paging can repeat an entry).

    A resource whose id is there but is not a string (a number, an object, a list: invalid FHIR) cannot be
    told apart from another or named in a note: it is left out, as the folder source and the bulk path leave
    it out, and counted in a warning (never with its content).
    """
    seen: set[str] = set()
    out = []
    invalid = 0
    for resource in resources:
        rid = resource.get("id")
        if rid is not None:
            if rid.__class__ is not str:
                invalid += 1
                continue
            if rid in seen:
                continue
            seen.add(rid)
        out.append(resource)
    if invalid:
        log.warning("FHIR server sent %d resource(s) whose id is not a string (invalid FHIR); not used", invalid)
    return out


# -- the folder ---------------------------------------------------------------------------------

_WANTED = ("Patient", "Encounter", "Observation")
_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]*)?$")
# Bulk-Data files hold one resource type each and are named after it ('Condition.000.ndjson').
_NAMED_TYPE = re.compile(r"([A-Z][A-Za-z]+)(?=[._\-]|$)")


def patient_of_reference(reference: Any) -> str | None:
    """The Patient id a plain reference names ('Patient/p1', an absolute URL, a versioned one), else None."""
    match = _PATIENT_REF.search(reference) if isinstance(reference, str) else None
    return match.group(1) if match else None


def _patient_key(reference: Any, urns: dict[str, str]) -> str | None:
    if not reference or not isinstance(reference, str):     # invalid FHIR names no patient: skipped
        return None
    if reference in urns:
        return urns[reference]
    if reference.startswith("urn:uuid:"):
        return reference[9:]  # Synthea and others use the Patient's id as its uuid
    match = _PATIENT_REF.search(reference)
    return match.group(1) if match else None


class _Index:
    """Patient id → raw JSON of that patient's resources (bytes: ~3x smaller than dicts)."""

    def __init__(self) -> None:
        self.patients: dict[str, bytes] = {}
        self.by_patient: dict[str, dict[str, list[bytes]]] = {t: {} for t in _WANTED[1:]}
        self._seen: dict[str, set[str]] = {t: set() for t in _WANTED[1:]}
        self.duplicates = 0
        self.skipped = 0

    def add(self, resource: dict[str, Any], raw: bytes | None, urns: dict[str, str]) -> None:
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if rtype == "Bundle":
            self.add_bundle(resource)
            return
        if rtype not in _WANTED:
            return
        if not isinstance(rid, str):
            self.skipped += 1
            return
        raw = raw if raw is not None else orjson.dumps(resource)
        if rtype == "Patient":
            if rid in self.patients:
                self.duplicates += 1
            else:
                self.patients[rid] = raw
            return
        subject = resource.get("subject")
        key = _patient_key(subject.get("reference") if isinstance(subject, dict) else None, urns)
        if key is None:
            self.skipped += 1
        elif rid in self._seen[rtype]:
            self.duplicates += 1
        else:
            self._seen[rtype].add(rid)
            self.by_patient[rtype].setdefault(key, []).append(raw)

    def add_bundle(self, bundle: dict[str, Any]) -> None:
        entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
        urns = {e["fullUrl"]: e["resource"]["id"] for e in entries
                if e.get("fullUrl") and isinstance(e.get("resource"), dict)
                and e["resource"].get("resourceType") == "Patient" and e["resource"].get("id")}
        for entry in entries:
            if isinstance(entry.get("resource"), dict):
                self.add(entry["resource"], None, urns)


class FolderSource(Source):
    """A read-only folder of Bulk-Data NDJSON (optionally .gz) and/or .json resources/Bundles.

    Read once, lazily, on first use. NDJSON files named after another resource type
    ('Condition.ndjson', 'Claim.000.ndjson.gz') are not read at all.
    """

    read_only = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._index: _Index | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Read the folder now (e.g. at start-up, to fail fast on a bad file)."""
        self._loaded()

    def patient_ids(self) -> list[str]:
        """Every Patient id in the folder (folder source only; for bulk runs)."""
        return sorted(self._loaded().patients)

    def patient(self, patient_id: str) -> dict[str, Any]:
        raw = self._loaded().patients.get(_check_id(patient_id))
        if raw is None:
            raise UpstreamNotFound(f"Patient/{patient_id} is not in the folder source")
        return orjson.loads(raw)

    def encounters(self, patient_id: str) -> list[dict[str, Any]]:
        rows = self._loaded().by_patient["Encounter"].get(_check_id(patient_id), [])
        return [orjson.loads(raw) for raw in rows]

    def observations(self, patient_id: str, codes: Codes | None = None,
                     since: datetime | None = None,
                     until: datetime | None = None) -> list[dict[str, Any]]:
        _check_aware(since, "since")
        _check_aware(until, "until")
        rows = self._loaded().by_patient["Observation"].get(_check_id(patient_id), [])
        observations = [orjson.loads(raw) for raw in rows]
        if codes is not None:
            exact = {(s, c) for s, c in codes if s}
            any_system = {c for s, c in codes if not s}
            observations = [o for o in observations if _has_code(o, exact, any_system)]
        if since is not None or until is not None:
            observations = [o for o in observations if _in_dates(o, since, until)]
        return observations

    def write(self, resource: dict[str, Any], *, retries: int | None = None) -> dict[str, Any]:
        raise NotSupported("the folder source is read-only")

    # -- reading --------------------------------------------------------------------------------

    def _loaded(self) -> _Index:
        with self._lock:  # the first requests may arrive together; read the folder once
            if self._index is None:
                self._index = self._read()
            return self._index

    def _read(self) -> _Index:
        if not self.path.is_dir():
            raise ConfigurationError(f"FHIR source folder {self.path} does not exist")
        index = _Index()
        files = 0
        for file in sorted(self.path.iterdir()):
            name = file.name
            if name.startswith(".") or not file.is_file():
                continue
            if name.endswith((".ndjson", ".ndjson.gz")):
                named = _NAMED_TYPE.match(name)
                if named and named.group(1) not in _WANTED + ("Bundle",):
                    continue
                for number, line in _lines(file):
                    resource = _parse(line, file, number)
                    index.add(resource, line, {})
            elif name.endswith((".json", ".json.gz")):
                resource = _parse(_read_bytes(file), file, None)
                index.add(resource, None, {})
            else:
                continue
            files += 1
        log.info("folder source %s: %d files, %d patients", self.path, files,
                 len(index.patients))
        if index.duplicates or index.skipped:
            log.warning("folder source %s: ignored %d repeated ids and %d resources without id "
                        "or patient subject", self.path, index.duplicates, index.skipped)
        return index


def _open(file: Path) -> Any:
    return gzip.open(file, "rb") if file.name.endswith(".gz") else open(file, "rb")


def _read_bytes(file: Path) -> bytes:
    try:
        with _open(file) as handle:
            return handle.read()
    except (OSError, EOFError) as exc:
        raise ConfigurationError(f"{file}: cannot read ({exc})", expression=str(file)) from exc


def _lines(file: Path) -> Iterator[tuple[int, bytes]]:
    try:
        with _open(file) as handle:
            for number, line in enumerate(handle, start=1):
                line = line.strip()
                if line:
                    yield number, line
    except (OSError, EOFError) as exc:
        raise ConfigurationError(f"{file}: cannot read ({exc})", expression=str(file)) from exc


def _parse(data: bytes, file: Path, line: int | None) -> dict[str, Any]:
    """One resource; a broken file is the operator's to fix, so ConfigurationError (500)."""
    where = f"{file}, line {line}" if line is not None else str(file)
    try:
        resource = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ConfigurationError(f"{where}: not valid JSON ({exc})", expression=where) from None
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        if line is None:  # e.g. a Bulk-Data manifest lying next to the NDJSON
            log.debug("folder source: %s is not a FHIR resource; skipped", file)
            return {}
        raise ConfigurationError(f"{where}: not a FHIR resource (no resourceType)",
                                 expression=where)
    return resource


# -- search semantics, as a server applies them -----------------------------------------------

def _has_code(observation: dict[str, Any], exact: set[tuple[str, str]],
              any_system: set[str]) -> bool:
    code = observation.get("code")
    codings = code.get("coding") if isinstance(code, dict) else None
    # A code that is not valid FHIR matches no code search (as a server's index would not hold it).
    for coding in codings if isinstance(codings, list) else ():
        if not isinstance(coding, dict):
            continue
        value, system = coding.get("code"), coding.get("system")
        if not isinstance(value, str) or not isinstance(system, (str, type(None))):
            continue
        if value in any_system or (system, value) in exact:
            return True
    return False


def _effective_range(observation: dict[str, Any]) -> tuple[datetime, datetime] | None:
    """The instants effective[x] covers; what the 'date' search parameter is compared with."""
    # As times.effective_time: an element that is there (not null) counts, readable or not (false, 0 raise).
    value = observation.get("effectiveDateTime")
    if value is None:
        value = observation.get("effectiveInstant")
    if value is not None:
        return datetime_range(value)
    period = observation.get("effectivePeriod")
    if period is not None and not isinstance(period, dict):
        raise ValueError("effectivePeriod is not a Period")
    if period and (period.get("start") is not None or period.get("end") is not None):
        start = datetime_range(period["start"])[0] if period.get("start") is not None else MIN_TIME
        end = datetime_range(period["end"])[1] if period.get("end") is not None else MAX_TIME
        return start, end
    return None


def _in_dates(observation: dict[str, Any], since: datetime | None,
              until: datetime | None) -> bool:
    """ge/le match when the ranges overlap (https://hl7.org/fhir/R4/search.html#prefix)."""
    try:
        covered = _effective_range(observation)
    except ValueError:      # (times raises ValueError for anything it cannot read, non-strings included)
        log.warning("Observation/%s: unreadable effective time; left out of a date search",
                    observation.get("id"))
        return False
    if covered is None:  # no effective[x]: a server has nothing to compare either
        return False
    first, last = covered
    return (since is None or last >= since) and (until is None or first <= until)


def make_source(url_or_path: str, *, token: str | None = None, timeout: float = 10.0,
                retries: int = 3, retry_after_cap: float = 30.0, auth: Auth | None = None,
                batch: bool | None = False) -> Source:
    """A ServerSource for an http(s) URL (``batch``: as ServerSource's), else a FolderSource for an
    existing folder."""
    if url_or_path.startswith(("http://", "https://")):
        return ServerSource(FhirClient(url_or_path, token=token, timeout=timeout, retries=retries,
                                       retry_after_cap=retry_after_cap, auth=auth), batch=batch)
    if not Path(url_or_path).is_dir():
        raise ConfigurationError(f"FHIR source {url_or_path!r} is neither an http(s) URL nor a "
                                 "folder", expression="source_url")
    return FolderSource(url_or_path)
