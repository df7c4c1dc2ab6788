"""Bulk Data client: kick off $export at the hospital, poll, download NDJSON, score in bulk, write back in Bundles.

https://hl7.org/fhir/uv/bulkdata/export.html — kick-off with ``Prefer: respond-async`` answers 202 and a
status URL; polling answers 202 (``X-Progress``, ``Retry-After``; 429 when polled too fast) until a 200
manifest (``transactionTime``, ``output[]``, ``error[]``, ``deleted[]``) or a 4xx/5xx OperationOutcome (the
export failed, unless an issue is ``transient``); DELETE cancels. The files may be redirected (e.g. to
object storage). The next run asks ``_since`` the last manifest's ``transactionTime``, once a run has been
complete (error files: see PER_RESOURCE).
"""
from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import idna
import orjson
import requests
from urllib3.util import parse_url

from .config import Settings
from .errors import FhirAiError, UpstreamError, UpstreamTimeout
from .fhir import smart
from .fhir.ids import ID as _FHIR_ID, usable_id
from .fhir.client import _DEFAULT_PORTS, Auth, _loads, _response_outcome, _retry_after, outcome_text
from .jobs.state import JobStore
from .search import parse_query
from .search.params import MAX_COUNT
from .store import Store
from .store.indexing import split_reference
from .store.provenance import MappingUsed
from .store.trail import NewAssessment

log = logging.getLogger(__name__)

TYPES = ("Patient", "Encounter", "Observation")
NDJSON = "application/fhir+ndjson"
STORE_BATCH = 500         # assessments per local store transaction
DEFAULT_POLL = 5.0        # seconds between polls when the server does not say
MAX_POLL = 300.0          # our own back-off never grows past this (a Retry-After is honoured as it is)
FAILING_FOR = 1800.0      # give up polling when the status URL has failed (no answer, 408, 5xx) this long
TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5         # hops followed for one file download
HEARTBEAT = 60.0          # seconds between a running export job's signs of life (its updated_at)
STALE_AFTER = 900.0       # a running export job not heard from this long belongs to a run that stopped
_ISSUE_CODE = re.compile(r"[a-z-]{1,40}")             # http://hl7.org/fhir/issue-type: logged, nothing else


@dataclass
class OutputFile:
    type: str
    url: str
    count: int | None = None


@dataclass
class Manifest:
    transaction_time: str
    requires_access_token: bool | None
    output: list[OutputFile]
    error: list[OutputFile]
    request: str | None = None
    deleted: list[OutputFile] = field(default_factory=list)   # v2: Bundles of DELETE entries

    @classmethod
    def parse(cls, body: Any) -> "Manifest":
        if not isinstance(body, dict) or not isinstance(body.get("transactionTime"), str):
            raise UpstreamError("the export manifest has no transactionTime", temporary=False)
        files = {name: [OutputFile(str(o.get("type")), str(o.get("url")), o.get("count"))
                        for o in body.get(name) or [] if isinstance(o, dict) and o.get("url")]
                 for name in ("output", "error", "deleted")}
        return cls(body["transactionTime"], body.get("requiresAccessToken"), files["output"], files["error"],
                   body.get("request"), files["deleted"])


# What an error-severity issue in an export's error files does to the next run's ``_since``, by its code
# (http://hl7.org/fhir/R4/codesystem-issue-type.html). These say the server could not export a resource
# for a reason that lies with that resource: it is invalid (invalid and its children), or a child of
# processing that names one resource's fault - it refers to what is not there (not-found, deleted), breaks
# a rule (business-rule, code-invalid, duplicate ...). Asking again will not mend them, and a resource that
# is mended gets a new lastUpdated, so a later ``_since`` export brings it anyway. They are counted and
# reported (codes only) but let ``_since`` advance: one bad resource must not pin the hospital's
# incremental exports to one point until someone runs --full.
# Every other error keeps ``_since`` where it was, so that the next run asks for the same again: bare
# processing (the Bulk Data IG's own example of a whole export failing is severity error, code
# processing, "An internal timeout has occurred") and not-supported (a type or parameter the server will
# not export: nothing of it came); forbidden and suppressed (a scope we lost looks just like this, and
# access given back later does not change the resources it hid, so a later ``_since`` would never bring
# them); the transient family (transient, exception, timeout, throttled, lock-error, no-store,
# incomplete); our credentials (security, login, unknown, expired); too-costly (the server's load, not
# the resource); conflict (a resource changing while exported); codes we do not know; lines that are no
# OperationOutcome; and any ``fatal`` issue (an export of something failed outright, not one resource).
PER_RESOURCE = frozenset({
    "invalid", "structure", "required", "value", "invariant",
    "duplicate", "multiple-matches", "not-found", "deleted", "too-long", "code-invalid", "extension",
    "business-rule",
})


@dataclass
class Downloaded:
    """One manifest's files in a folder, and what its error files said (counts and issue codes only:
    the diagnostics may name patients)."""
    files: dict[str, list[Path]] = field(default_factory=dict)     # output files by resource type
    deleted: list[Path] = field(default_factory=list)
    errors: int = 0                 # issues that keep _since: all but warnings and PER_RESOURCE errors
    warnings: int = 0               # issues of severity warning or information: they do not block
    error_codes: Counter[str] = field(default_factory=Counter)
    skipped: int = 0                # error issues PER_RESOURCE: reported, but _since advances
    skipped_codes: Counter[str] = field(default_factory=Counter)

    def read_error_file(self, path: Path) -> None:
        with open(path, "rb") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    outcome = orjson.loads(line)
                except orjson.JSONDecodeError:
                    outcome = None
                issues = outcome.get("issue") if isinstance(outcome, dict) else None
                if not isinstance(issues, list) or not issues:
                    self.errors += 1
                    self.error_codes["unreadable"] += 1
                    continue
                for issue in issues:
                    issue = issue if isinstance(issue, dict) else {}
                    severity = issue.get("severity")
                    if severity in ("information", "warning"):
                        self.warnings += 1
                        continue
                    code = str(issue.get("code"))
                    code = code if _ISSUE_CODE.fullmatch(code) else "other"
                    if severity == "error" and code in PER_RESOURCE:
                        self.skipped += 1
                        self.skipped_codes[code] += 1
                    else:
                        self.errors += 1
                        self.error_codes[code] += 1

    def add(self, other: "Downloaded") -> None:
        """Count another manifest's error files with these."""
        self.errors, self.warnings, self.skipped = (self.errors + other.errors, self.warnings + other.warnings,
                                                    self.skipped + other.skipped)
        self.error_codes.update(other.error_codes)
        self.skipped_codes.update(other.skipped_codes)


@dataclass
class WriteBackCounts:
    bundles: int = 0
    errors: list[str] = field(default_factory=list)
    written_ids: list[str] = field(default_factory=list)    # RiskAssessment ids written
    failed_ids: list[str] = field(default_factory=list)     # RiskAssessment ids not written

    @property
    def written(self) -> int:
        return len(self.written_ids)

    @property
    def failed(self) -> int:
        return len(self.failed_ids)


class BulkDataClient:
    """The $export protocol against one FHIR server; the token never leaves that server unless the
    manifest says the files need it (``requiresAccessToken``)."""

    def __init__(self, base_url: str, *, token: str | None = None, auth: Auth | None = None,
                 timeout: float = 30.0, retries: int = 4, max_wait: float = 21600.0,
                 session: requests.Session | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        self._origin = _wire_origin(self.base_url)
        self.token, self.auth = token, auth
        self.timeout, self.retries, self.max_wait = timeout, max(0, retries), max_wait
        self.session = session or requests.Session()
        self._sleep, self._clock = sleep, clock

    def close(self) -> None:
        self.session.close()

    # -- the protocol ---------------------------------------------------------------------------
    def kick_off(self, *, group: str | None = None, types: Iterable[str] = TYPES, since: str | None = None,
                 patients: list[str] | None = None) -> str:
        """Start an export; the status URL. ``patients`` (POST kick-off) limits it to those patients."""
        path = f"Group/{group}/$export" if group else "Patient/$export"
        headers = {"Accept": "application/fhir+json", "Prefer": "respond-async"}
        if patients:
            params: list[dict[str, Any]] = [{"name": "_outputFormat", "valueString": NDJSON},
                                            {"name": "_type", "valueString": ",".join(types)}]
            if since:
                params.append({"name": "_since", "valueInstant": since})
            params += [{"name": "patient", "valueReference": {"reference": f"Patient/{p}"}} for p in patients]
            response = self._request("POST", f"{self.base_url}/{path}", headers={
                **headers, "Content-Type": "application/fhir+json"},
                data=orjson.dumps({"resourceType": "Parameters", "parameter": params}))
        else:
            query = {"_outputFormat": NDJSON, "_type": ",".join(types)}
            if since:
                query["_since"] = since
            response = self._request("GET", f"{self.base_url}/{path}", headers=headers, params=query)
        if response.status_code != 202:
            raise self._error("export kick-off", response)
        location = response.headers.get("Content-Location")
        if not location:
            raise UpstreamError("export kick-off: 202 without Content-Location", temporary=False)
        status_url = _joined(self.base_url + "/", location, "export kick-off: the status URL")
        self._same_origin(status_url, "status URL")
        log.info("export started (%s%s)", path, f", since {since}" if since else "")
        return status_url

    def poll(self, status_url: str, *, waited: float = 0.0) -> Manifest:
        """Wait for the export, ``max_wait`` seconds at most, less ``waited`` (how long earlier runs
        waited for it already) (then UpstreamTimeout; the caller cancels).
        Retry-After is honoured up to what is left of that; 429 (polled too fast) is polled again, and
        so are no answer and 408/5xx until they have lasted ``FAILING_FOR`` seconds in a row; a 4xx/5xx
        OperationOutcome without a ``transient`` issue means the export failed, and so does any other
        4xx: not polled again."""
        started = self._clock()
        failing_since: float | None = None
        failures = 0
        while True:
            try:
                response: requests.Response | None = self._request(
                    "GET", status_url, headers={"Accept": "application/json"}, retry=False)
            except UpstreamError as exc:        # no answer: refused, reset, timed out
                response, problem = None, exc
            if response is not None and response.status_code == 200:
                return Manifest.parse(_json(response))
            if response is not None and response.status_code == 202:
                failing_since, failures = None, 0
                progress = response.headers.get("X-Progress")
                if progress:
                    log.info("export in progress: %s", progress[:100])
                wait = _retry_after(response) or DEFAULT_POLL
            else:
                if response is not None:
                    codes = _failed_export(response)
                    if codes is not None or response.status_code not in TRANSIENT:
                        raise self._error("export", response, codes=codes)
                    problem = self._error("export status", response)
                now = self._clock()
                if response is not None and response.status_code == 429:
                    failing_since = None        # polled too fast: the server is there
                elif failing_since is None:
                    failing_since = now
                elif now - failing_since >= FAILING_FOR:
                    raise problem
                failures += 1
                wait = _retry_after(response) or min(MAX_POLL, DEFAULT_POLL * 2 ** min(failures - 1, 16))
                # The status only: an OperationOutcome's text may name patients.
                log.warning("export status: %s; polling again in %.0f s",
                            f"HTTP {response.status_code}" if response is not None else "no answer", wait)
            remaining = self.max_wait - waited - (self._clock() - started)
            if remaining <= 0:
                raise UpstreamTimeout(f"the export did not finish within {self.max_wait:.0f} s")
            self._sleep(min(wait, remaining))

    def cancel(self, status_url: str) -> None:
        """DELETE the export (202 expected; 404 means it is already gone)."""
        response = self._request("DELETE", status_url, headers={"Accept": "application/fhir+json"})
        if response.status_code not in (200, 202, 204, 404):
            raise self._error("export cancel", response)
        log.info("export cancelled")

    def download(self, manifest: Manifest, folder: Path, types: Iterable[str] = TYPES) -> Downloaded:
        """Stream each wanted output file to ``folder`` as '<Type>.<n>.ndjson', the deleted and error
        files as 'deleted.<n>.ndjson' and 'errors.<n>.ndjson'; the error files' issues are counted."""
        folder.mkdir(parents=True, exist_ok=True)
        wanted = set(types)
        got = Downloaded()
        for n, item in enumerate(manifest.output):
            if item.type not in wanted:
                continue
            path = folder / f"{item.type}.{n:03d}.ndjson"
            self._fetch_file(item.url, path, manifest.requires_access_token)
            got.files.setdefault(item.type, []).append(path)
        for n, item in enumerate(manifest.deleted):
            path = folder / f"deleted.{n:03d}.ndjson"
            self._fetch_file(item.url, path, manifest.requires_access_token)
            got.deleted.append(path)
        for n, item in enumerate(manifest.error):
            path = folder / f"errors.{n:03d}.ndjson"
            self._fetch_file(item.url, path, manifest.requires_access_token)
            got.read_error_file(path)
        if got.errors:
            log.warning("export reported %d error(s) (issue codes: %s) and %d warning(s); the run will not "
                        "count as complete", got.errors, issue_codes(got.error_codes), got.warnings)
        if got.skipped:
            log.warning("export could not export %d resource(s) (issue codes: %s); reported, but not asked "
                        "for again", got.skipped, issue_codes(got.skipped_codes))
        if got.warnings and not got.errors:
            log.info("export reported %d warning(s)", got.warnings)
        return got

    def write_bundles(self, resources: Iterable[dict[str, Any]], size: int) -> WriteBackCounts:
        """PUT every resource (deterministic ids: a repeat is a no-op) in transaction Bundles of ``size``.
        A chunk the server did not take - refused, an entry not 2xx, no answer after the retries, an
        answer that is not a transaction-response for every entry - is counted failed with its ids."""
        counts = WriteBackCounts()
        for chunk in _chunks(resources, max(1, size)):
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
                {"fullUrl": f"{self.base_url}/{r['resourceType']}/{r['id']}", "resource": r,
                 "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in chunk]}
            counts.bundles += 1
            try:
                response = self._request("POST", self.base_url, data=orjson.dumps(bundle), headers={
                    "Accept": "application/fhir+json", "Content-Type": "application/fhir+json"})
                if response.status_code >= 300:
                    raise self._error("write-back transaction", response)
                entries = _json(response).get("entry") or []
                if (not isinstance(entries, list) or len(entries) != len(chunk)
                        or not all(isinstance(e, dict) for e in entries)):
                    raise UpstreamError(f"write-back transaction: the response does not answer the "
                                        f"{len(chunk)} requests entry by entry", temporary=True)
            except FhirAiError as exc:
                counts.failed_ids += [r["id"] for r in chunk]
                counts.errors.append(exc.message)
                continue
            # The response's entries answer the request's, in the same order (FHIR R4 http.html#transaction).
            for r, e in zip(chunk, entries):
                answer = e.get("response")
                status = answer.get("status") if isinstance(answer, dict) else None
                if str(status or "").startswith("2"):
                    counts.written_ids.append(r["id"])
                else:
                    counts.failed_ids.append(r["id"])
                    counts.errors.append(str(status))
        return counts

    # -- plumbing -------------------------------------------------------------------------------
    def owns(self, url: str) -> bool:
        """Whether ``url`` is a plain URL on the FHIR server's origin (as requests will connect)."""
        try:
            return _plain_origin(url, "") == self._origin
        except UpstreamError:
            return False

    def _same_origin(self, url: str, what: str) -> None:
        if _plain_origin(url, f"the server's {what} is") != self._origin:
            raise UpstreamError(f"the server's {what} points to another host; refusing to send our credentials "
                                "there", temporary=False)

    def _headers(self) -> dict[str, str]:
        if self.auth is not None:
            return dict(self.auth.headers())
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _fetch_file(self, url: str, path: Path, requires_token: bool | None) -> None:
        """Only files on our server's origin, or https ones elsewhere. The token goes with a file only
        when the manifest says files need it; to our own server also when the manifest does not say
        (files behind the same OAuth); never otherwise. A download cut off is fetched again (within
        ``retries``, from the manifest's URL: a redirect's pre-signed URL may have expired by then);
        the file appears under its name only when complete."""
        origin = self._file_origin(url, "the export manifest lists a file on")
        host = origin[1]
        ours = origin == self._origin
        send_token = requires_token is True or (requires_token is None and ours)
        if send_token and not ours:
            log.warning("export file on another host; sending the token because requiresAccessToken is true")
        partial = path.with_name(path.name + ".part")
        attempt = 0
        while True:
            response = self._open_file(url, send_token)
            if response.status_code != 200:
                problem = self._error("export file download", response)
                response.close()
                raise problem
            try:
                with open(partial, "wb") as out:
                    for block in response.iter_content(1 << 20):
                        out.write(block)
            except requests.RequestException as exc:
                if attempt >= self.retries:
                    raise UpstreamError(f"export file download from {host}: cut off ({type(exc).__name__})") from exc
            else:
                partial.replace(path)
                return
            finally:
                response.close()
                partial.unlink(missing_ok=True)      # gone already when complete
            attempt += 1
            log.warning("export file download from %s cut off; fetching it again", host)
            self._sleep(DEFAULT_POLL * 2 ** (attempt - 1))

    def _open_file(self, url: str, send_token: bool) -> requests.Response:
        """GET a file, following at most ``MAX_REDIRECTS`` redirects: an output file server may hand the
        download on, e.g. to object storage with a pre-signed URL. Each target must pass the rule the
        manifest's URL passed (our origin, or https; no user information, no backslash), checked before
        it is asked. The token goes only to the origin the manifest named, never to one a redirect
        names: a pre-signed URL must not get it (object storage refuses a second authorization), and a
        redirect must not carry it off. The hops are followed here, not by requests, so that each target
        is checked before anything is sent to it; the origin compared is the one requests connects to."""
        first = _wire_origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            response = self._request("GET", url, headers={"Accept": NDJSON}, stream=True,
                                     token_for=first if send_token else None)
            if response.status_code not in REDIRECTS:
                return response
            location = response.headers.get("Location")
            response.close()
            if not location:
                raise UpstreamError(f"export file download: HTTP {response.status_code} without Location",
                                    temporary=False, upstream_status=response.status_code)
            url = _joined(url, location, "a redirect of an export file leads to")
            origin = self._file_origin(url, "a redirect of an export file leads to")
            log.debug("export file redirected (HTTP %d) to %s", response.status_code, origin[1])
        raise UpstreamError(f"export file download: more than {MAX_REDIRECTS} redirects", temporary=False)

    def _file_origin(self, url: str, what: str) -> tuple[str, str, int | None]:
        """The origin of a file URL we may fetch: the FHIR server's own, or any over https (the URL
        itself stays out of the message: a pre-signed one carries its signature). A URL with user
        information or a backslash is refused: parsers disagree on its host."""
        origin = _plain_origin(url, what)
        scheme, host, _ = origin
        if origin != self._origin and scheme != "https":
            raise UpstreamError(f"{what} {host or 'no host'} over {scheme or 'no scheme'}; only https files "
                                "(or ones on the FHIR server's own origin) are fetched", temporary=False)
        return origin

    def _request(self, method: str, url: str, *, headers: dict[str, str], params: Any = None,
                 data: bytes | None = None, stream: bool = False, retry: bool = True,
                 token_for: tuple[str, str, int | None] | None | bool = True) -> requests.Response:
        """One call; temporary failures retried (Retry-After honoured) unless ``retry`` is False; a 401
        with an auth hook renews the token once. The request is prepared first and exactly that is sent:
        the credentials go with it only when the origin it will connect to (its prepared URL as urllib3
        reads it) is ``token_for``; True (the protocol's calls) means the FHIR server's origin, and a
        call that would go elsewhere is refused."""
        ours = token_for is True
        try:
            plain = _plain_origin(url, f"{method}:")
            prepared = self.session.prepare_request(requests.Request(method, url, headers=headers, params=params,
                                                                     data=data))
            origin = _wire_origin(prepared.url or "")
        except (requests.RequestException, ValueError) as exc:
            raise UpstreamError(f"{method}: a URL that cannot be read ({type(exc).__name__})",
                                temporary=False) from exc
        if origin != plain or (ours and origin != self._origin):
            raise UpstreamError(f"{method}: the URL leads to {origin[1] or 'no host'}, not where it seems or not "
                                "the FHIR server; refused", temporary=False)
        credentials = origin == (self._origin if ours else token_for)
        send_settings = self.session.merge_environment_settings(prepared.url, {}, stream, None, None)
        path = urlsplit(prepared.url or "").path
        renewed = False
        attempt = 0
        while True:
            request = prepared.copy()
            if credentials:
                request.headers.update(self._headers())
            try:
                response = self.session.send(request, timeout=self.timeout, allow_redirects=False, **send_settings)
            except requests.Timeout as exc:
                if not retry or attempt >= self.retries:
                    raise UpstreamTimeout(f"{method} {path}: no answer in {self.timeout:.0f} s") from exc
                wait = DEFAULT_POLL
            except requests.RequestException as exc:
                if not retry or attempt >= self.retries:
                    raise UpstreamError(f"{method} {path}: {type(exc).__name__}") from exc
                wait = DEFAULT_POLL
            except ValueError as exc:      # requests reads a redirect's Location even when not following it
                raise UpstreamError(f"{method} {path}: the answer names a URL that cannot be read",
                                    temporary=False) from exc
            else:
                if response.status_code == 401 and self.auth is not None and credentials and not renewed:
                    self.auth.on_unauthorized()
                    renewed = True
                    continue
                if not retry or response.status_code not in TRANSIENT or attempt >= self.retries:
                    return response
                wait = _retry_after(response) or DEFAULT_POLL * 2 ** attempt
                log.warning("%s %s: HTTP %d; retrying in %.0f s", method, path,
                            response.status_code, min(MAX_POLL, wait))
            attempt += 1
            self._sleep(min(MAX_POLL, wait))

    def missing_patients(self, patients: Iterable[str], *, deleted: Iterable[str] = (),
                         known: Iterable[str] = ()) -> set[str]:
        """Those of ``patients`` the server no longer has.

        A patient export naming an unknown patient fails (HTTP 404, or a failed job on some servers): a run
        that asked for a patient deleted at the hospital would fail, and ask again, on every run. Gone: a
        patient the export itself lists as deleted (``deleted``), one a read answers 410 Gone for, and one it
        answers 404 with a FHIR OperationOutcome for - but a server may hide what a client may not see behind
        a 404 too, so a 404 counts only when its issues name no access problem (ACCESS_CODES) and this client
        can read patients at all: another read here answered 200, or, failing that, a read of a patient the
        export changed (``known``). Any other answer (401/403, a redirect, a 404 that is no FHIR, a 5xx after
        the retries) tells nothing: that patient is asked for, as every one was before this check.
        """
        deleted = set(deleted)
        patients = list(patients)
        missing = {patient for patient in patients if patient in deleted}
        not_found: set[str] = set()
        readable = False
        for patient in patients:
            if patient in missing or not _is_id(patient):
                continue
            status, outcome = self._read_patient(patient)
            if status == 410:
                missing.add(patient)
            elif status == 404 and outcome is not None and not ACCESS_CODES & outcome:
                not_found.add(patient)
            elif status == 200 and outcome == {"Patient"}:
                readable = True
            else:
                log.warning("reading a patient whose inputs were deleted: %s; asked for all the same",
                            f"HTTP {status}" if status else "no answer")
        if not_found and not readable:
            for patient in [p for p in sorted(set(known) - set(patients)) if _is_id(p)][:CONTROL_READS]:
                status, body = self._read_patient(patient)
                if status == 200 and body == {"Patient"}:
                    readable = True
                    break
        if not_found and not readable:
            log.warning("%d patient(s) whose inputs were deleted are not found, but no patient could be read here "
                        "(not found may mean not for this client): asked for all the same", len(not_found))
        elif not_found:
            missing |= not_found
        if missing:
            log.warning("%d patient(s) whose inputs were deleted are gone at the server: not asked for, their "
                        "assessments kept", len(missing))
        return missing

    def _read_patient(self, patient: str) -> tuple[int | None, set[str] | None]:
        """A read's status (None: no answer after the retries) and what it says: a FHIR OperationOutcome's
        issue codes, {"Patient"} for that very Patient, None for anything else."""
        try:
            response = self._request("GET", f"{self.base_url}/Patient/{patient}",
                                     headers={"Accept": "application/fhir+json"})
        except UpstreamError:
            return None, None
        if response.status_code == 200:
            try:
                body = _loads(response.content)
            except orjson.JSONDecodeError:
                return 200, None
            same = isinstance(body, dict) and body.get("resourceType") == "Patient" and body.get("id") == patient
            return 200, {"Patient"} if same else None
        return response.status_code, _outcome_codes(response)

    def _error(self, what: str, response: requests.Response, codes: list[str] | None = None) -> UpstreamError:
        """``codes``: the issue codes of an export that failed (not worth trying again)."""
        text = _response_outcome(response)
        status = response.status_code
        return UpstreamError(f"{what}: HTTP {status}" + (f" ({text})" if text else "")
                             + (f" [issue codes: {', '.join(codes)}]" if codes else ""),
                             temporary=status in TRANSIENT and codes is None, upstream_status=status,
                             retry_after=_retry_after(response))


def _is_id(value: str) -> bool:
    """A FHIR id that makes a read of its own (not dots only: '.' and '..' a URL resolves away)."""
    return usable_id(value)


# Patients the export changed that are read, at most, to tell whether this client can read patients at all.
CONTROL_READS = 3
# Issue codes of a 404 that may mean "not for you" rather than "not there" (a server may hide a record so).
ACCESS_CODES = frozenset({"forbidden", "security", "suppressed", "login", "unknown", "expired", "not-supported",
                          "throttled"})


def _outcome_codes(response: requests.Response) -> set[str] | None:
    """The issue codes of an answer that is a FHIR OperationOutcome; None for any other body."""
    try:
        body = _loads(response.content)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return None
    return {i.get("code") for i in body.get("issue") or [] if isinstance(i, dict) and isinstance(i.get("code"), str)}


def _wire_origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host (lower case) and port of a URL as urllib3 - what requests connects with - reads it
    (urlsplit may read another host: 'https://a.example\\@b.example/' is a.example to urllib3).
    ValueError if it is no URL."""
    parts = parse_url(url)
    scheme = (parts.scheme or "").lower()
    return scheme, (parts.host or "").strip("[]").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


def _plain_origin(url: str, what: str) -> tuple[str, str, int | None]:
    """The origin of a URL the server handed us (a status URL, a file, a redirect), if it is a plain one:
    readable, without user information or a backslash, and its host the same to urlsplit (as urllib3
    normalises a host: IDNA, an IPv6 zone's '%25') and to urllib3; otherwise UpstreamError (not temporary;
    the URL stays out of the message)."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        split = (scheme, _normalised_host(parts.hostname or "", scheme), parts.port or _DEFAULT_PORTS.get(scheme))
        wire = _wire_origin(url)
    except ValueError as exc:            # idna.IDNAError is one too
        raise UpstreamError(f"{what} a URL that cannot be read".strip(), temporary=False) from exc
    if "\\" in url or "@" in parts.netloc:
        raise UpstreamError(f"{what} a URL with user information or a backslash; refused".strip(),
                            temporary=False)
    if split != wire:
        raise UpstreamError(f"{what} a URL whose host (or port) reads differently to urlsplit and to urllib3; "
                            "refused".strip(), temporary=False)
    return wire


def _normalised_host(host: str, scheme: str) -> str:
    """A host as urlsplit reads it, lower case, normalised as urllib3 normalises an http(s) one: each
    non-ASCII label IDNA-encoded ('bücher.example' is 'xn--bcher-kva.example'), an IPv6 zone's '%25'
    read as '%' (RFC 6874). ValueError when a label is no IDNA one."""
    if scheme not in ("http", "https", ""):
        return host.lower()
    if ":" in host:                                      # IPv6
        address, percent, zone = host.partition("%")
        if zone.startswith("25") and zone != "25":
            zone = zone[2:]
        return f"{address}{percent}{zone}".lower()
    return ".".join(label.lower() if label.isascii() else idna.encode(label.lower(), strict=True,
                                                                      std3_rules=True).decode("ascii")
                    for label in host.split("."))


def _joined(base: str, location: str, what: str) -> str:
    """``location`` (a Content-Location, a redirect's Location) read against ``base``; UpstreamError
    (not temporary) when it is no URL."""
    try:
        return urljoin(base, location)
    except ValueError as exc:
        raise UpstreamError(f"{what} a URL that cannot be read", temporary=False) from exc


def _failed_export(response: requests.Response) -> list[str] | None:
    """The issue codes of a status answer saying that the export failed: a 4xx/5xx OperationOutcome
    without a ``transient`` issue (a 429 only says we polled too fast); None for anything else."""
    if response.status_code < 400 or response.status_code == 429:
        return None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None          # e.g. a proxy's error page: the export may well go on
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return None
    codes = [str(i.get("code")) for i in body.get("issue") or [] if isinstance(i, dict)]
    codes = [c if _ISSUE_CODE.fullmatch(c) else "other" for c in codes]
    return None if "transient" in codes else codes


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError("the server's answer is not JSON", temporary=False) from exc
    return body if isinstance(body, dict) else {}


def issue_codes(counts: Counter[str]) -> str:
    """The five commonest issue codes with their counts, e.g. 'not-found 3, invalid 1'."""
    return ", ".join(f"{code} {n}" for code, n in counts.most_common(5))


def _chunks(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def read_ndjson(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as handle:
        for n, line in enumerate(handle, 1):
            if line.strip():
                try:
                    item = orjson.loads(line)
                except orjson.JSONDecodeError:
                    item = None
                if not isinstance(item, dict):
                    raise UpstreamError(f"{path.name} line {n} is not a JSON object", temporary=False)
                yield item


def _host_and_path(url: str) -> tuple[str, str]:
    """Host (lower case, default port dropped) and path of an absolute URL; the scheme is left out: a
    server behind a TLS proxy often writes http:// references to itself."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.port and parts.port not in (80, 443):
        host += f":{parts.port}"
    return host, parts.path.rstrip("/")


def _local_reference(reference: Any, base_url: str) -> tuple[str | None, str] | None:
    """(type, id) of a reference to a resource on our FHIR server: relative, or absolute on its base."""
    if not isinstance(reference, str):
        return None
    if "://" in reference:
        try:
            host, path = _host_and_path(reference)
            base_host, base_path = _host_and_path(base_url)
        except ValueError:           # a port that is not a number, an unclosed [
            return None
        if host != base_host or not path.startswith(base_path + "/"):
            return None
        reference = path[len(base_path) + 1:]
    return split_reference(reference)


def changed_patients(paths: dict[str, list[Path]], base_url: str = "",
                     patients: set[str] | None = None) -> list[str]:
    """Patients with any changed resource in an incremental (``_since``) export: the Patients, and the
    ``Patient/<id>`` subjects of the rest (a Group, Device or Location subject is no patient of ours).
    ``patients``, if given, gets the ids of the Patient resources themselves."""
    found: set[str] = set()
    for kind, files in paths.items():
        for path in files:
            for resource in read_ndjson(path):
                if kind == "Patient":
                    if isinstance(resource.get("id"), str):
                        found.add(resource["id"])
                        if patients is not None:
                            patients.add(resource["id"])
                    continue
                subject = resource.get("subject")
                parsed = _local_reference(subject.get("reference"), base_url) if isinstance(subject, dict) else None
                if parsed and parsed[0] == "Patient":
                    found.add(parsed[1])
    return sorted(found)


def deleted_references(paths: list[Path], base_url: str) -> list[str]:
    """'Type/id' of each resource the export's deleted files list (Bundles of DELETE entries) on our server."""
    gone: list[str] = []
    for path in paths:
        for bundle in read_ndjson(path):
            for entry in bundle.get("entry") or []:
                request = entry.get("request") if isinstance(entry, dict) else None
                if not isinstance(request, dict) or request.get("method") != "DELETE":
                    continue
                parsed = _local_reference(request.get("url"), base_url)
                if parsed and parsed[0] and parsed[0].isalpha() and _FHIR_ID.fullmatch(parsed[1]):
                    gone.append(f"{parsed[0]}/{parsed[1]}")
    return gone


def deleted_patients(store: Store, paths: list[Path], base_url: str, *, batch: int = 20) -> list[str]:
    """Patients with a stored assessment that used a resource the export lists as deleted (Bundles of
    DELETE entries, Bulk Data v2 ``deleted``). The deleted entry names only the resource, so the
    patient comes from our own trail: an assessment's Provenance lists its inputs (Provenance?entity=)."""
    gone = deleted_references(paths, base_url)
    found: set[str] = set()
    seen: set[str] = set()
    for start in range(0, len(gone), batch):
        query = parse_query("Provenance", [("entity", ",".join(gone[start:start + batch])),
                                           ("_count", str(MAX_COUNT))])
        while True:
            page = store.search(query)
            for provenance in page.resources:
                for target in provenance.get("target") or []:
                    parsed = split_reference(target.get("reference") or "")
                    if not parsed or parsed[0] != "RiskAssessment" or parsed[1] in seen:
                        continue
                    seen.add(parsed[1])
                    subject = (store.get_assessment(parsed[1]) or {}).get("subject") or {}
                    patient = split_reference(subject.get("reference") or "")
                    if patient and patient[0] == "Patient":
                        found.add(patient[1])
            if page.next_cursor is None:
                break
            query.cursor = page.next_cursor
    if gone:
        log.info("export lists %d deleted resource(s); %d patient(s) had assessments using them",
                 len(gone), len(found))
    return sorted(found)


@dataclass
class ExportRun:
    """What one export-and-assess run did."""
    job_id: str
    transaction_time: str
    since: str | None
    patients: int = 0
    assessed: int = 0
    stored: int = 0           # new in the local store (a repeat of a stored assessment is not counted)
    queued: int = 0           # not written back: left to the write-back worker (fhir-ai worker)
    patients_gone: int = 0    # assessed before on inputs now deleted, and no longer at the server
    written: WriteBackCounts = field(default_factory=WriteBackCounts)
    output: Path | None = None
    issues: Downloaded = field(default_factory=Downloaded)   # what the manifests' error files said
    resumed: str | None = None    # the job whose export this run took over (it had stopped while that ran)

    @property
    def export_errors(self) -> int:
        """Issues in the error files that keep ``_since`` (see PER_RESOURCE)."""
        return self.issues.errors

    @property
    def export_skipped(self) -> int:
        """Resources the server could not export for good (PER_RESOURCE): reported, not asked again."""
        return self.issues.skipped

    @property
    def complete(self) -> bool:
        """Everything exported that a later export could bring, and all written back: this run's
        transactionTime is the next ``_since``."""
        return not self.written.failed and not self.export_errors

    @property
    def partial(self) -> bool:
        """Complete, but the server reported resources it could not export (PER_RESOURCE)."""
        return self.complete and self.export_skipped > 0


def client_from_settings(settings: Settings, **kwargs: Any) -> BulkDataClient:
    return BulkDataClient(settings.source_url, token=settings.source_token,
                          auth=smart.auth_from_settings(settings), timeout=max(30.0, settings.source_timeout),
                          max_wait=settings.bulk_export_timeout, **kwargs)


def export_and_assess(settings: Settings, registry: Any, jobs: JobStore, client: BulkDataClient, *,
                      workdir: Path, output: Path, group: str | None = None, full: bool = False,
                      models: list[str] | None = None, explain: str = "elevated",
                      write_back: bool | None = None) -> ExportRun:
    """One run: export (incremental from the last run unless ``full``), score, write back, remember.

    An incremental export holds only what changed, not the history a model reads, so the patients it
    names - and those whose assessments used a resource it lists as deleted - are exported again in
    full (POST kick-off with ``patient``) before scoring. Downloads go to ``workdir``/export and
    ``workdir``/changed, emptied first: a run scores only its own files. The run's ``transactionTime``
    becomes the next ``_since`` only when the run is complete (no export error a later export could
    mend, all written back); otherwise, and on any failure, the job is left failed. Resources the server
    could not export for good (PER_RESOURCE) make a complete run ``partial``: counted by issue code in
    the job's result (``notExported``), not asked for again.
    """
    from .bulk import bulk_assess
    scope = f"{client.base_url}/{'Group/' + group if group else 'Patient'}/$export"
    last = None if full else jobs.last("bulk-export", scope)
    since = last.result.get("transactionTime") if last else None
    job_id = f"bulk-{uuid.uuid4().hex}"
    interrupted, recorded = _interrupted(jobs, client, scope, since, job_id)
    jobs.create(job_id, kind="bulk-export", scope=scope, as_of=datetime.now(timezone.utc),
                request={"request": f"GET {scope}", "since": since,
                         **({"resumes": interrupted} if interrupted else {})})
    jobs.start(job_id)
    heartbeat = _Heartbeat(jobs, job_id)
    exports = _Exports(client, jobs, job_id, group=group, since=since, recorded=recorded)
    sleep = exports.plain_sleep = client._sleep
    client._sleep = heartbeat.checked(sleep)      # this run's waits between polls, restored below
    try:
        heartbeat.start()
        # The exports taken over go on this job's record: should this run stop too, the next resumes them
        # (should recording them fail, the run fails and cancels them).
        exports.keep_recorded()
        manifest = exports.wait("export")
        heartbeat.check()
        folder: Path | None = _emptied(workdir / "export")
        got = client.download(manifest, folder)
        heartbeat.check()
        run = ExportRun(job_id, manifest.transaction_time, since, output=output, resumed=interrupted)
        run.issues.add(got)
        if since:
            exported: set[str] = set()          # Patient resources in the export: there (again), whatever else says
            changed = set(changed_patients(got.files, client.base_url, exported))
            deleted = set(deleted_patients(jobs.store, got.deleted, client.base_url))
            purged = {ref.split("/", 1)[1] for ref in deleted_references(got.deleted, client.base_url)
                      if ref.startswith("Patient/")} - exported
            # A patient known only from deleted inputs may be gone as a whole (a record purged); one the export
            # lists as deleted is, even if a changed resource still names it: neither is asked for.
            gone = client.missing_patients(sorted((deleted - changed) | (changed & purged)), deleted=purged,
                                           known=changed - purged)
            run.patients_gone = len(gone)
            patients = sorted((changed | deleted) - gone)
            log.info("incremental export: %d patient(s) changed since %s (%d for deleted resources, %d of "
                     "them gone at the server)", len(patients), since, len(deleted - changed), len(gone))
            if patients:
                full_manifest = exports.wait("changed", patients=patients)
                heartbeat.check()
                folder = _emptied(workdir / "changed")
                run.issues.add(client.download(full_manifest, folder))
                heartbeat.check()
            else:
                folder = None
        if folder is not None and any(path for kind in TYPES for path in folder.glob(f"{kind}.*.ndjson")):
            stats = bulk_assess(folder, output, registry, models=models or ["deterioration"], explain=explain,
                                progress=False)
            run.patients, run.assessed = stats.patients, stats.assessed
            # Scored: kept here even if the job ended meanwhile (no assessment is lost); not written back then.
            scored_with = {m: MappingUsed.of(registry.get(m)[1]) for m in models or ["deterioration"]}
            run.stored, superseded = store_results(jobs.store, output, mappings=scored_with)
            heartbeat.check()
            if settings.write_back if write_back is None else write_back:
                # An assessment stored before and changed since (withdrawn) is not sent again as it was:
                # its newer version goes through the outbox.
                run.written = client.write_bundles((r for r in read_ndjson(output) if r["id"] not in superseded),
                                                   settings.bulk_bundle_size)
                jobs.store.record_write_backs(run.written.written_ids, client.base_url)
        problems = []
        if run.written.failed:
            run.queued = jobs.store.record_write_backs(run.written.failed_ids, client.base_url,
                                                       error="; ".join(run.written.errors[:3]))
            problems.append(f"{run.written.failed} RiskAssessment(s) not written back (stored here, queued for "
                            f"the write-back worker): " + "; ".join(run.written.errors[:3]))
        if run.export_errors:
            problems.append(f"the export reported {run.export_errors} error(s) (issue codes: "
                            f"{issue_codes(run.issues.error_codes)}); what was exported was scored, the next run "
                            "asks since the last complete one")
        if run.export_skipped:
            problems.append(f"the server could not export {run.export_skipped} resource(s) (issue codes: "
                            f"{issue_codes(run.issues.skipped_codes)})")
        exports.drop_unused()
        if run.complete:
            result = {"transactionTime": run.transaction_time, "patients": run.patients, "assessed": run.assessed,
                      "stored": run.stored, "written": run.written.written, "bundles": run.written.bundles}
            if run.partial:      # complete as far as _since goes; what the server could not export, by code
                result["notExported"] = dict(run.issues.skipped_codes)
            if run.patients_gone:    # their assessments stay as they were (append-only); nothing to rescore
                result["patientsGone"] = run.patients_gone
            if not jobs.set_result(job_id, result, status="completed"):
                log.warning("export job %s had been taken over by another run; its result is not kept", job_id)
            if run.partial:
                log.warning("export %s: partial: %s", job_id, "; ".join(problems))
        else:
            jobs.fail(job_id, "; ".join(problems), 502)
        return run
    except FhirAiError as exc:
        exports.drop_unused()
        if not isinstance(exc, RunStopped):     # its job has ended already (cancelled, or taken over)
            jobs.fail(job_id, exc.message, exc.status)
        raise
    except BaseException as exc:
        exports.drop_unused()
        # Only the kind: the text of an unexpected error may quote the data.
        jobs.fail(job_id, f"the run stopped: {type(exc).__name__}", 500)
        raise
    finally:
        client._sleep = sleep
        heartbeat.stop()


def _emptied(folder: Path) -> Path:
    """``folder`` without the NDJSON an earlier run left there (a reused --workdir)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.ndjson*"):
        stale.unlink()
    return folder


def store_results(store: Store, path: Path, *, batch: int = STORE_BATCH,
                  mappings: dict[str, MappingUsed] | None = None) -> tuple[int, set[str]]:
    """Keep every RiskAssessment of a scored export in the local store, as ``$assess`` keeps its own:
    versioned, with Provenance (model, version, inputs, and the mapping of ``mappings`` by model id),
    an AuditEvent each and search entries, so auditors find them and no assessment exists only at the
    hospital. ``batch`` assessments per transaction; a re-run's repeats (same identifier) are audited
    as repeats, not stored twice.
    Returns how many were new, and the ids of repeats whose stored copy has changed since (withdrawn)."""
    created, superseded = 0, set()
    mappings = mappings or {}
    for chunk in _chunks(read_ndjson(path), batch):
        items = []
        for resource in chunk:
            method = resource["method"]["coding"][0]
            items.append(NewAssessment(resource, method["code"], method["version"],
                                       mapping=mappings.get(method["code"])))
        for saved in store.save_assessments(items):
            created += saved.created
            if not saved.created and saved.resource.get("meta", {}).get("versionId") != "1":
                superseded.add(saved.resource["id"])
    return created, superseded


GONE = frozenset({404, 410})    # a status URL answering these has no export behind it any more


def _interrupted(jobs: JobStore, client: BulkDataClient, scope: str, since: str | None,
                 job_id: str) -> tuple[str | None, dict[str, Any]]:
    """Take over the jobs of this export whose runs stopped while their exports were under way (killed,
    host restarted; a run that fails or is interrupted at the keyboard cancels its export and leaves its
    job failed); the one this run (``job_id``) resumes and the exports it recorded.
    A running job's run refreshes it every HEARTBEAT seconds, so only one not heard from for STALE_AFTER
    is taken over - failed, naming this run, by one UPDATE that only one run can win - whatever it asked
    for: a run that stopped is never heard from again, and no later run would take it over otherwise.
    The newest of them that asked the same (``since``) with an export this run can poll is resumed; the
    others' exports are cancelled. A job heard from within STALE_AFTER is left alone (its run may well be
    going: overlapping runs), however old."""
    silent_since = datetime.now(timezone.utc) - timedelta(seconds=STALE_AFTER)
    resumed: tuple[str | None, dict[str, Any]] = (None, {})
    for old in jobs.every("bulk-export", scope, "running"):
        exports = old.result.get("exports")
        usable = {step: {"kickedOffAt": old.created_at.isoformat(), **item}     # recorded before kickedOffAt was
                  for step, item in (exports.items() if isinstance(exports, dict) else [])
                  if isinstance(item, dict) and isinstance(item.get("statusUrl"), str)
                  and client.owns(item["statusUrl"])}
        resume = resumed[0] is None and bool(usable) and old.request.get("since") == since
        message = (f"the run stopped while its export was under way; job {job_id} resumed it" if resume else
                   f"the run stopped while its export was under way; job {job_id} cancelled it")
        if not jobs.take_over(old.id, silent_since=silent_since, message=message):
            log.info("job %s of this export is still running (heard from within %.0f s, or taken over by another "
                     "run); left alone", old.id, STALE_AFTER)
            continue
        if resume:
            log.info("resuming the export of job %s (the run stopped while it was under way)", old.id)
            resumed = (old.id, usable)
            continue
        log.info("job %s of this export stopped while its export was under way; cancelling that export", old.id)
        for item in usable.values():
            _cancel(client, item["statusUrl"])
    return resumed


class RunStopped(FhirAiError):
    """The run's job was ended from outside while the run went on (an admin's DELETE /jobs/{id}, or another
    run that took it over): the run stops at its next step."""
    status = 409
    code = "conflict"


class _Heartbeat:
    """While a run goes on, a thread refreshes its job (updated_at) every HEARTBEAT seconds - through
    polls, waits of any length (a Retry-After of hours), downloads, scoring and write-back - so that
    another run tells a live run from one that stopped (STALE_AFTER). It stops with the run, or when
    the job is no longer running. ``check`` (between the run's steps, and around each wait between
    polls) raises RunStopped once the job is no longer running."""

    def __init__(self, jobs: JobStore, job_id: str) -> None:
        self.jobs, self.job_id = jobs, job_id
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.ident is not None:          # started
            self._thread.join(timeout=60)

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT):
            try:
                if not self.jobs.heartbeat(self.job_id):
                    return
            except Exception as exc:       # noqa: BLE001 - the next beat tries again
                log.warning("export job %s: heartbeat not recorded (%s)", self.job_id, type(exc).__name__)

    def check(self) -> None:
        try:
            status = self.jobs.status(self.job_id)
        except Exception as exc:           # noqa: BLE001 - not knowing is no reason to stop: the next check asks
            log.warning("export job %s: its status could not be read (%s); the run goes on", self.job_id,
                        type(exc).__name__)
            return
        if status != "running":
            raise RunStopped(f"export job {self.job_id} was {status or 'removed'} while the run went on "
                             "(DELETE /jobs/{id}, or taken over by another run): stopped")

    def checked(self, sleep: Callable[[float], None]) -> Callable[[float], None]:
        """``sleep`` with a check before and after: a wait between polls ends the run once the job ended."""
        def wait(seconds: float) -> None:
            self.check()
            sleep(seconds)
            self.check()
        return wait


class _Exports:
    """A run's exports ('export', then 'changed' for the changed patients' full records). Each status URL
    is kept in the job's result as soon as the kick-off answers, with when it was kicked off, so that a
    run that stops while the server prepares the files is resumed by the next one instead of asking the
    server for the same export twice; the result is replaced when the job ends. A recorded export is
    polled again rather than kicked off anew (a 404 or 410 there: it is gone, kick off), for what is left
    of ``max_wait`` since its kick-off (a chain of stopped runs does not wait for it for ever: once that
    has passed, it is cancelled and kicked off anew); the changed patients' one only if it asked for the
    same patients (compared by a hash: no patient ids in the job's result). An export is cancelled only
    while this run's job is running: one taken over by another run is that run's to poll."""

    def __init__(self, client: BulkDataClient, jobs: JobStore, job_id: str, *, group: str | None,
                 since: str | None, recorded: dict[str, Any]) -> None:
        self.client, self.jobs, self.job_id, self.group, self.since = client, jobs, job_id, group, since
        self.recorded = dict(recorded)         # taken over from an interrupted run, not used yet
        self.kept: dict[str, Any] = {}
        self.plain_sleep: Callable[[float], None] | None = None   # the client's own: cancelling is not stopped

    def keep_recorded(self) -> None:
        """Record the exports taken over in this run's job."""
        if self.recorded:
            self._keep(dict(self.recorded))

    def wait(self, step: str, *, patients: list[str] | None = None) -> Manifest:
        key = hashlib.sha256(",".join(patients).encode()).hexdigest()[:32] if patients else None
        old = self.recorded.pop(step, None)
        age = _age(old.get("kickedOffAt")) if old is not None else None
        if old is not None and old.get("for") == key and age is not None and age < self.client.max_wait:
            try:
                return self._wait(old["statusUrl"], waited=age)
            except UpstreamError as exc:
                if exc.upstream_status not in GONE:
                    raise
                log.warning("the %s being resumed is gone (HTTP %d); starting a new one", step, exc.upstream_status)
        elif old is not None and old.get("for") == key:
            log.warning("the %s being resumed was kicked off more than %.0f s ago; cancelling it and starting "
                        "a new one", step, self.client.max_wait)
            self._cancel(old["statusUrl"])
        elif old is not None:
            self._cancel(old["statusUrl"])        # ours, for other patients: not wanted now
        kicked_off = datetime.now(timezone.utc).isoformat()
        status_url = self.client.kick_off(group=self.group, since=None if patients else self.since,
                                          patients=patients)
        self._keep({**self.kept, step: {"statusUrl": status_url, "for": key, "kickedOffAt": kicked_off}})
        return self._wait(status_url)

    def drop_unused(self) -> None:
        """Cancel what the interrupted run had started and this one did not need (before the job ends)."""
        for item in self.recorded.values():
            self._cancel(item["statusUrl"])
        self.recorded.clear()

    def _keep(self, kept: dict[str, Any]) -> None:
        self.kept = kept
        self.jobs.set_result(self.job_id, {"since": self.since, "exports": kept})

    def _wait(self, status_url: str, waited: float = 0.0) -> Manifest:
        """Poll; an export given up for any reason is cancelled (unless the server says it is gone)."""
        try:
            return self.client.poll(status_url, waited=waited)
        except BaseException as exc:
            if not (isinstance(exc, UpstreamError) and exc.upstream_status in GONE):
                self._cancel(status_url)     # do not leave the server working for nobody
            raise

    def _cancel(self, status_url: str) -> None:
        try:
            # A running job's exports are ours, and those of one cancelled while running (an admin's DELETE
            # stopped the run): nobody else polls them. One taken over (failed, naming the other run; kept so
            # when an admin deletes it later) is the other run's.
            job = self.jobs.get(self.job_id)
            ours = job is not None and (job.status == "running" or (job.status == "cancelled" and not job.error))
        except Exception as exc:            # noqa: BLE001 - not knowing, leave the export be
            log.warning("could not read the export job's status (%s); its export is not cancelled",
                        type(exc).__name__)
            return
        if ours:
            checked, self.client._sleep = self.client._sleep, self.plain_sleep or self.client._sleep
            try:
                _cancel(self.client, status_url)
            finally:
                self.client._sleep = checked
        else:
            log.warning("export job %s was taken over by another run; its export is left to that run", self.job_id)


def _age(when: Any) -> float | None:
    """Seconds since an ISO 8601 instant we recorded; None if it is not one."""
    try:
        then = datetime.fromisoformat(when) if isinstance(when, str) else None
    except ValueError:
        return None
    if then is None or then.tzinfo is None:
        return None
    return max(0.0, (datetime.now(timezone.utc) - then).total_seconds())


def _cancel(client: BulkDataClient, status_url: str) -> None:
    """DELETE an export, best effort: a cancel that fails is logged, never raised."""
    try:
        client.cancel(status_url)
    except Exception as exc:           # noqa: BLE001 - the error that stopped the export matters more
        log.warning("could not cancel the export: %s",
                    exc.message if isinstance(exc, FhirAiError) else type(exc).__name__)
