"""The one HTTP client for the hospital's FHIR server: session, auth, retries, paging."""
from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any, Protocol
from urllib.parse import urlencode, urljoin, urlsplit

import orjson
import requests
import urllib3
from requests.hooks import dispatch_hook
from requests.cookies import RequestsCookieJar, extract_cookies_to_jar, merge_cookies
from requests.structures import CaseInsensitiveDict

from ..errors import (BadRequest, ConfigurationError, UpstreamError, UpstreamNotFound,
                      UpstreamTimeout)

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
FORM = "application/x-www-form-urlencoded"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# A gateway or the server itself saying "too slow" is reported to our caller as a timeout too.
TIMEOUT_STATUSES = frozenset({408, 504})
MAX_PAGES = 10_000
_DEFAULT_PORTS = {"http": 80, "https": 443}

# What a server that does not take a search by POST answers one (https://hl7.org/fhir/R4/http.html#search
# makes POST [base]/[type]/_search a SHALL, but not every server or gateway routes it): the method not
# allowed or not implemented (405, 501), the form body refused (415), '_search' taken for an id or an
# unknown route (404: a search of a type the server has would not be 404, and if it is, the GET
# that follows says so), or a 400 whose OperationOutcome says 'not-supported'. Anything else - other
# 4xx, and 5xx, 429, timeouts (retried as for any call) - is the same error it would be for a GET.
SEARCH_POST_REFUSED = frozenset({404, 405, 415, 501})


class SearchPostRefused(UpstreamError):
    """The server does not take a search by POST [type]/_search (see SEARCH_POST_REFUSED): search by GET."""


class PagingLimit(UpstreamError):
    """A search had more pages than its ``max_pages``: raised after every match of those pages was yielded,
    so a caller that can continue from what it read (a search sorted by _lastUpdated) may."""


# Search parameters, or a query string already encoded by encode_params (e.g. cached).
Params = Mapping[str, Any] | list[tuple[str, Any]] | str | None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


def outcome_text(body: Any) -> str:
    """The human text of an OperationOutcome: each issue's details.text, else its diagnostics."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    texts = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = (issue.get("details") or {}).get("text") or issue.get("diagnostics")
        if text:
            texts.append(str(text))
    return "; ".join(texts)


_BOM = b"\xef\xbb\xbf"


def _loads(content: bytes) -> Any:
    """JSON, after a UTF-8 byte order mark if there is one (RFC 8259 8.1: a parser may ignore it; some
    servers send it), which orjson refuses."""
    return orjson.loads(content[len(_BOM):] if content.startswith(_BOM) else content)


def _response_outcome(response: requests.Response) -> str:
    try:
        return outcome_text(_loads(response.content))
    except orjson.JSONDecodeError:
        return ""


def _retry_after(response: requests.Response | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), or None."""
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT by definition (RFC 9110 5.6.7)
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _refuses_search_post(response: requests.Response) -> bool:
    """Whether an answer to POST [type]/_search says the server does not search by POST (see
    SEARCH_POST_REFUSED); retried statuses never get here."""
    if response.request is not None and response.request.method != "POST":
        # A 301/302/303 on the way turned it into a GET without the form: not the search we asked for.
        return True
    status = response.status_code
    if status in SEARCH_POST_REFUSED:
        return True
    if status != 400:
        return False
    try:
        body = _loads(response.content)
    except orjson.JSONDecodeError:
        return False
    return (isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"
            and any(isinstance(issue, dict) and issue.get("code") == "not-supported"
                    and issue.get("severity") in ("error", "fatal")
                    for issue in body.get("issue") or []))


class Auth(Protocol):
    """How requests are authorised (e.g. fhir.smart.SmartBackendAuth)."""

    def headers(self) -> Mapping[str, str]:
        """Headers for the next request (may fetch or renew a token)."""

    def on_unauthorized(self) -> None:
        """The server answered 401: drop the cached credential so the next headers() renews it."""


class _Unauthorized(Exception):
    """HTTP 401 while an ``auth`` hook is in use: renew once, then give up (internal)."""

    def __init__(self, response: requests.Response) -> None:
        super().__init__("HTTP 401")
        self.response = response


class _LateAnswer(requests.Timeout):
    """The deadline passed while the answer was still arriving (FhirClient._read_body)."""

    def __init__(self) -> None:
        super().__init__("the answer had not arrived in full by the deadline")


class _Temporary(Exception):
    """One failed attempt worth retrying (internal to the retry loop). ``not_json``: a complete answer
    that is not JSON, retried once only (see ``_with_retries``)."""

    def __init__(self, reason: str, *, response: requests.Response | None = None,
                 timeout: bool = False, not_json: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response
        self.timeout = timeout
        self.not_json = not_json


def _breaks_off(content: bytes, error: orjson.JSONDecodeError) -> bool:
    """Whether a body that does not parse stops short - the start of a JSON document, cut off where
    the connection broke (an answer framed by Content-Length that breaks off is already refused by
    urllib3: ChunkedEncodingError; one framed by the connection's close is not) - rather than holding
    what JSON never has (NaN, Infinity, an HTML page, trailing text): that a second try rarely cures."""
    try:
        text = content.decode("utf-8-sig")    # a byte order mark is skipped (see _loads)
    except UnicodeDecodeError as exc:    # cut inside a character: the bytes run out at the very end
        return exc.end == len(content) and exc.reason == "unexpected end of data"
    return error.pos >= len(text.rstrip())


# Characters a query may hold as they are (RFC 3986 3.4: query = *( pchar / "/" / "?" ), and pchar
# takes ":" and the sub-delims, "," among them), written so in FHIR's own examples
# ("code=http://loinc.org|8867-4,http://loinc.org|9279-1") and decoded to the same value by any server
# (a raw "," is even the form FHIR defines as "or"). Left unencoded, the deterioration mapping's 62 codes
# take 1,643 characters with 62 escapes instead of 2,139 with 310: urllib3 re-checks every byte and
# escape of a request target on every request (connectionpool._encode_target), and the URL must stay
# under sources.MAX_URL (often one search instead of two). "|" is not allowed in a query
# (Tomcat refuses it raw) and stays %7C; "+" stays %2B, as space is "+".
QUERY_SAFE = ":/,"


def encode_params(params: Params) -> str:
    """A query string from ``params`` (None values left out, lists repeated), ``QUERY_SAFE`` kept as is.

    A ``str`` is taken as an already encoded query and returned unchanged (what requests does with
    one, except that requests would then re-quote it: give only what ``encode_params`` makes).
    """
    if not params:
        return ""
    if isinstance(params, str):
        return params
    pairs: list[tuple[str, Any]] = []
    for key, values in (params.items() if isinstance(params, Mapping) else params):
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            values = [values]
        pairs.extend((key, value) for value in values if value is not None)
    return urlencode(pairs, safe=QUERY_SAFE)


BODY_CHUNK = 64 * 1024      # bytes read between two deadline checks (_read_body)
LATE_GRACE = 0.05           # seconds past the deadline to finish reading what has already arrived


class FhirClient:
    """Talks FHIR R4 JSON to one server; retries only temporary failures; never leaks the token."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 10.0,
                 retries: int = 3, retry_after_cap: float = 30.0, backoff: float = 1.0,
                 deadline: float | None = None, session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 auth: Auth | None = None) -> None:
        """``backoff``: the first wait between attempts (doubled each time) when the server names none.
        ``deadline``: a ``clock()`` time that no attempt or wait may pass, for a caller who is waiting (a
        CDS hook): each attempt's timeout is cut to what is left, and a retry whose wait (backoff or
        Retry-After) would reach it is not made - the call fails at once instead."""
        self.base_url = base_url.rstrip("/")
        try:
            self._origin = _origin(self.base_url)
        except ValueError as exc:           # e.g. a port that is not a number, an unclosed [IPv6
            raise ConfigurationError(f"not an http(s) FHIR base URL: {base_url!r}",
                                     expression="source_url") from exc
        if self._origin[0] not in _DEFAULT_PORTS or not self._origin[1]:
            raise ConfigurationError(f"not an http(s) FHIR base URL: {base_url!r}",
                                     expression="source_url")
        self.timeout = timeout
        self.retries = max(0, retries)
        self.retry_after_cap = retry_after_cap
        self.backoff = backoff
        self.deadline = deadline
        self._sleep = sleep
        self._clock = clock
        self._own_session = session is None
        self.session = session or requests.Session()
        if self._own_session:
            # Every call goes to this one origin (see _url): read the environment's proxy and CA settings
            # once, instead of requests doing it again on every call (≈0.3 ms each).
            found = self.session.merge_environment_settings(self.base_url, {}, None, None, None)
            self.session.trust_env = False
            self.session.proxies.update(found["proxies"])
            self.session.verify = found["verify"]
            if found["cert"]:
                self.session.cert = found["cert"]
        # Per-request headers rather than session.headers: a shared session stays untouched.
        self._headers = {"Accept": FHIR_JSON}
        if token and auth is not None:
            raise ConfigurationError("give a static token or an auth hook, not both",
                                     expression="source_token")
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.auth = auth

    def __repr__(self) -> str:  # never show the token
        return f"FhirClient({self.base_url!r})"

    # -- public calls -------------------------------------------------------------------------

    def get(self, path_or_url: str, params: Params = None, *, retries: int | None = None) -> dict[str, Any]:
        """GET a resource or Bundle; a relative path is taken from base_url (``retries``: as for ``put``)."""
        return self._call("GET", path_or_url, params=params, retries=retries)

    def put(self, resource: dict[str, Any], *, retries: int | None = None) -> dict[str, Any]:
        """PUT {type}/{id}: create or update, so a retry never duplicates. {} if no body.

        ``retries`` overrides the client's retry count for this call (0: one attempt, e.g. when a
        queue will retry later and a caller is waiting).
        """
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if not rtype or not rid:
            raise BadRequest("a resource needs resourceType and id to be PUT")
        return self._call("PUT", f"{rtype}/{rid}", body=resource, retries=retries)

    def post(self, path: str, body: dict[str, Any],
             headers: Mapping[str, str] | None = None, *, retries: int | None = None,
             quiet: bool = False) -> dict[str, Any]:
        """POST a JSON body (retried like any call: use it for operations, conditional creates with
        If-None-Exist and batches of reads; not for a plain create, and not for a search: that is
        ``search(post=True)``, a form body). ``path`` "" is the base URL itself. {} if no body. ``quiet``: giving
        up is logged at INFO, not ERROR (a caller that has another way, e.g. a batch read separately next)."""
        return self._call("POST", path or self.base_url, body=body, headers=headers, retries=retries, quiet=quiet)

    def wait(self, retry_after: float) -> None:
        """Wait as the server asked (Retry-After), up to the cap, never past the deadline."""
        delay = min(retry_after, self.retry_after_cap)
        left = self._time_left()
        if left is not None:
            delay = min(delay, max(left, 0.0))
        if delay > 0:
            self._sleep(delay)

    def search(self, resource_type: str, params: Params = None, *,
               max_pages: int = MAX_PAGES, retries: int | None = None,
               post: bool = False, more: Callable[[int], bool] | None = None,
               first: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Yield each matching resource, following Bundle.link[relation=next] page by page
        (``retries`` overrides the client's retry count for each page). ``more``: asked, with the pages
        read, whether to read on past ``max_pages`` (PagingLimit once it says no). ``first``: the first
        page, already read (a search answered inside a batch): only the next pages are asked for.

        ``post``: the first page is asked for by ``POST [type]/_search`` with the parameters as a form
        body (https://hl7.org/fhir/R4/http.html#search): no URL length limit, and no long URL for
        urllib3 to check byte by byte. A search is a read, so it is retried like a GET; the next pages
        are the server's own links, read by GET. A server that does not take it (SEARCH_POST_REFUSED)
        raises SearchPostRefused before anything is yielded: the caller searches by GET instead.
        """
        url: str | None = f"{self.base_url}/{resource_type}"
        page_params = params
        seen: set[str] = set()
        pages = 0
        while url:
            if first is not None and not pages:
                bundle = first
            elif post and not pages:
                bundle = self._call("POST", f"{url}/_search", form=encode_params(params), retries=retries)
            else:
                bundle = self._call("GET", url, params=page_params, retries=retries)
            pages += 1
            if bundle.get("resourceType") != "Bundle":
                raise UpstreamError(f"search {resource_type}: the hospital FHIR server answered "
                                    f"with a {bundle.get('resourceType')!r}, not a Bundle",
                                    temporary=False)
            entries = bundle.get("entry") or []
            for entry in entries if isinstance(entries, list) else [None]:
                if not (isinstance(entry, dict) and isinstance(entry.get("search") or {}, dict)
                        and isinstance(entry.get("resource") or {}, dict)):
                    raise UpstreamError(f"search {resource_type}: the hospital FHIR server answered with a Bundle "
                                        "whose entries are not objects with a resource and search objects",
                                        temporary=False)
                # 'outcome' entries are the server's warnings about the search, not matches.
                if (entry.get("search") or {}).get("mode") == "outcome":
                    log.debug("search %s: server note: %s", resource_type,
                              outcome_text(entry.get("resource")))
                    continue
                if entry.get("resource"):
                    yield entry["resource"]
            url, page_params = self._next_link(bundle), None
            if url and url in seen:
                raise UpstreamError(f"search {resource_type}: paging stopped after {pages} pages "
                                    "(the server repeats a next link)", temporary=False)
            if url and pages >= max_pages and not (more is not None and more(pages)):
                raise PagingLimit(f"search {resource_type}: paging stopped after {pages} pages (more than "
                                  "this search may read, or the server never ends)", temporary=False)
            if url:
                seen.add(url)

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------

    def _next_link(self, bundle: dict[str, Any]) -> str | None:
        for link in bundle.get("link") or []:
            if link.get("relation") == "next" and link.get("url"):
                # An absolute path ('/fhir/Observation?...') is relative to our origin, not base.
                return self._url(urljoin(self.base_url + "/", link["url"]))
        return None

    def _url(self, path_or_url: str) -> str:
        """An absolute URL on our server; refuses any other origin so the token stays home."""
        if "://" not in path_or_url:
            if {".", ".."} & set(path_or_url.split("?", 1)[0].split("/")):
                # Group/.. would be normalised to the server base: another resource than the one named
                raise BadRequest(f"a path segment '.' or '..' names no resource: {path_or_url.split('?', 1)[0]!r}")
            return f"{self.base_url}/{path_or_url.lstrip('/')}"
        self._check_origin(path_or_url, "sent a link", "refusing to send our credentials there")
        return path_or_url

    def _check_origin(self, url: str, what: str, consequence: str, status: int | None = None) -> None:
        """UpstreamError unless ``url`` is on our server's origin (links and redirects stay home);
        ``what`` the server did ("sent a link", "redirected")."""
        if _origin(url) != self._origin:
            # Log only the origin: the rest of a foreign URL may carry search values.
            scheme, host, port = _origin(url)
            log.warning("the server %s to %s://%s:%s outside %s: refused", what, scheme, host, port,
                        self.base_url)
            raise UpstreamError(f"the hospital FHIR server {what} to another host "
                                f"({scheme}://{host}:{port}); {consequence}", temporary=False,
                                upstream_status=status)

    def _call(self, method: str, path_or_url: str, *, params: Params = None,
              body: dict[str, Any] | None = None, form: str | None = None,
              headers: Mapping[str, str] | None = None, retries: int | None = None,
              quiet: bool = False) -> dict[str, Any]:
        """One call with retries; ``form``: an encoded search form, POSTed to [type]/_search."""
        url = self._url(path_or_url)
        all_headers = dict(self._headers)
        data = None
        if body is not None:
            all_headers["Content-Type"] = FHIR_JSON
            data = orjson.dumps(body)
        elif form is not None:
            all_headers["Content-Type"] = FORM
            data = form.encode("ascii")      # encode_params leaves nothing but ASCII
        all_headers.update(headers or {})
        where = urlsplit(url).path  # no query string in logs: it may hold search values
        search_post = form is not None
        if self.auth is None:
            return self._with_retries(method, url, where, params, data, all_headers, retries, search_post, quiet)
        try:
            return self._with_retries(method, url, where, params, data, all_headers, retries, search_post, quiet)
        except _Unauthorized:
            # A token can be revoked or the server's keys rotated before it expires: renew once.
            log.info("%s %s: HTTP 401; renewing the access token once", method, where)
            self.auth.on_unauthorized()
        try:
            return self._with_retries(method, url, where, params, data, all_headers, retries, search_post, quiet)
        except _Unauthorized as denied:
            raise self._fatal(method, where, denied.response) from None

    def _with_retries(self, method: str, url: str, where: str, params: Params,
                      data: bytes | None, headers: dict[str, str], retries: int | None = None,
                      search_post: bool = False, quiet: bool = False) -> dict[str, Any]:
        retries = self.retries if retries is None else max(0, retries)
        not_json = 0
        for attempt in range(retries + 1):
            try:
                attempt_headers = headers
                if self.auth is not None:  # per attempt: the token may be renewed meanwhile
                    attempt_headers = {**headers, **self.auth.headers()}
                return self._attempt(method, url, where, params, data, attempt_headers, search_post)
            except _Temporary as failure:
                not_json += failure.not_json
                if not_json >= 2:    # the same complete answer that is not JSON, twice: the server's own fault
                    raise self._not_json(method, where, failure, attempt + 1, quiet) from None
                if attempt >= retries:
                    raise self._exhausted(method, where, failure, attempt + 1, quiet) from None
                delay = self._delay(attempt, failure.response)
                left = self._time_left()
                if left is not None and delay >= left:
                    failure.reason += (f"; not retried: the wait of {delay:.1f} s would pass the deadline "
                                       f"({max(left, 0.0):.1f} s left)")
                    raise self._exhausted(method, where, failure, attempt + 1, quiet) from None
                log.warning("%s %s: %s; retry %d of %d in %.1f s", method, where, failure.reason,
                            attempt + 1, retries, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _delay(self, attempt: int, response: requests.Response | None) -> float:
        asked = _retry_after(response)
        delay = asked if asked is not None else self.backoff * 2 ** attempt  # 1, 2, 4 ... x backoff
        return min(delay, self.retry_after_cap)

    def _time_left(self) -> float | None:
        """Seconds until the deadline (negative once passed); None without one."""
        return None if self.deadline is None else self.deadline - self._clock()

    def _attempt(self, method: str, url: str, where: str, params: Params, data: bytes | None,
                 headers: dict[str, str], search_post: bool = False) -> dict[str, Any]:
        timeout = self.timeout
        left = self._time_left()
        if left is not None:
            if left <= 0:
                raise _Temporary("no time left before the deadline to ask", timeout=True)
            timeout = min(timeout, left)
        try:
            prepared = self._prepare(method, url, params, data, headers)
            # Our own session has trust_env off and the environment's settings already merged (see
            # __init__): Session.send's defaults are those settings. A caller's session may trust it.
            if self._own_session:
                response = self._send(prepared, timeout)
            else:
                settings = self.session.merge_environment_settings(prepared.url, {}, None, None, None)
                response = self.session.send(prepared, timeout=timeout, allow_redirects=True, **settings)
        except requests.Timeout as exc:
            why = str(exc) if isinstance(exc, _LateAnswer) else type(exc).__name__
            raise _Temporary(f"no answer within {timeout:.3g} s ({why})", timeout=True) from exc
        except requests.ConnectionError as exc:
            raise _Temporary(f"connection failed ({type(exc).__name__})") from exc
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
            raise _Temporary(f"the answer broke off or could not be decoded ({type(exc).__name__})") from exc
        except requests.TooManyRedirects as exc:
            raise UpstreamError(f"{method} {where}: the hospital FHIR server redirects without end ({exc})",
                                temporary=False) from None
        status = response.status_code
        if status == 401 and self.auth is not None:
            raise _Unauthorized(response)
        if status in RETRY_STATUSES:
            raise _Temporary(f"HTTP {status}", response=response,
                             timeout=status in TIMEOUT_STATUSES)
        if search_post and _refuses_search_post(response):
            raise SearchPostRefused(f"{method} {where}: the hospital FHIR server does not take a search "
                                    f"by POST (HTTP {status})", temporary=False, upstream_status=status)
        if status >= 400 or status < 200:
            raise self._fatal(method, where, response)
        if not response.content.strip():
            if (method == "GET" or search_post) and status == 200:
                # A read or a search page (by GET or by POST _search) always has a body: none is an answer
                # cut before its first byte (framed by the connection's close) or a broken proxy, not an
                # empty resource (a 202 or 204 may have none).
                raise _Temporary(f"HTTP {status} with an empty body", response=response)
            return {}
        try:
            parsed = _loads(response.content)
        except orjson.JSONDecodeError as exc:
            if _breaks_off(response.content, exc):
                raise _Temporary(f"HTTP {status} with a body that is not JSON: it breaks off after "
                                 f"{len(response.content)} bytes", response=response) from None
            # Complete but not JSON: a server writing NaN or Infinity answers so every time; a broken
            # proxy's HTML error page may pass. Tried once more (see _with_retries), not as often as a 503.
            raise _Temporary(f"HTTP {status} with a body that is not JSON ({exc.msg} at character {exc.pos})",
                             response=response, not_json=True) from None
        if not isinstance(parsed, dict):
            raise UpstreamError(f"{method} {where}: the hospital FHIR server answered with JSON "
                                "that is not a resource", temporary=False, upstream_status=status)
        return parsed

    def _send(self, prepared: requests.PreparedRequest, timeout: float) -> requests.Response:
        """``Session.send`` for our own session, by its adapter: the same request, proxies and TLS
        settings, response hooks run, cookies the server sets kept, the body read (inside the caller's
        error handling, as Session.send reads it); without the per-call merging, and no cookie parsing
        of answers that set none. Redirects are followed as the session follows them, but only on our
        origin (as ``_url`` keeps links there): a 307/308 would re-send a PUT or a search form elsewhere."""
        session = self.session
        options: dict[str, Any] = {"timeout": timeout, "verify": session.verify, "cert": session.cert,
                                   "proxies": session.proxies, "stream": False}
        history: list[requests.Response] = []
        while True:
            response = session.get_adapter(prepared.url).send(prepared, **options)
            if prepared.hooks.get("response"):       # the session's response hooks, as Session.send runs them
                response = dispatch_hook("response", prepared.hooks, response, **options)
            if "set-cookie" in response.headers:
                extract_cookies_to_jar(session.cookies, prepared, response.raw)
            if not response.is_redirect:
                self._read_body(response)            # now: a reset or timeout mid-body is retried
                response.history = history
                return response
            if len(history) >= session.max_redirects:
                raise requests.TooManyRedirects(f"more than {session.max_redirects} redirects", response=response)
            # The session builds the next request (method, body, headers, cookies, auth stripped on
            # another host) and reads and closes this answer; we send it once it stays on our origin.
            following = next(session.resolve_redirects(response, prepared, yield_requests=True, **options))
            self._check_origin(following.url, "redirected", "not following it with our request",
                               response.status_code)
            history.append(response)
            prepared = following

    def _read_body(self, response: requests.Response) -> None:
        """Read the whole body. With a deadline, as it arrives (urllib3's read1: what one socket read
        brings), checking the deadline between pieces: the timeout bounds each socket read only, so a
        server trickling its answer would otherwise hold a caller who is waiting (a CDS hook) long past
        the deadline. Past the deadline, what has already arrived is still read (each socket read then
        waits at most LATE_GRACE, for LATE_GRACE in all): an answer that is complete is taken, one
        still arriving is not waited for. urllib3's errors become requests errors."""
        if self.deadline is None:
            response.content
            return
        raw = response.raw
        chunks = []
        late = False
        try:
            while chunk := raw.read1(BODY_CHUNK, decode_content=True):
                chunks.append(chunk)
                left = self.deadline - self._clock()
                if left <= 0:
                    if left < -LATE_GRACE:
                        response.close()
                        raise _LateAnswer()
                    if not late:
                        late = True
                        sock = getattr(getattr(raw, "connection", None), "sock", None)
                        if sock is not None:
                            sock.settimeout(LATE_GRACE)
        except urllib3.exceptions.ReadTimeoutError as exc:
            if late:
                response.close()
                raise _LateAnswer() from exc
            raise requests.ReadTimeout(exc) from exc
        except urllib3.exceptions.DecodeError as exc:
            raise requests.exceptions.ContentDecodingError(exc) from exc
        except urllib3.exceptions.ProtocolError as exc:
            raise requests.exceptions.ChunkedEncodingError(exc) from exc
        except urllib3.exceptions.SSLError as exc:
            raise requests.ConnectionError(exc) from exc
        response._content = b"".join(chunks)    # what Response.content keeps (the stream is consumed)
        response._content_consumed = True

    def _prepare(self, method: str, url: str, params: Params, data: bytes | None,
                 headers: dict[str, str]) -> requests.PreparedRequest:
        """What ``session.request`` would send, with the query string appended by us.

        requests re-parses and re-quotes the whole URL character by character (≈1 ms for the
        ~1,800-character code lists of an Observation search); the query is encoded here (see
        QUERY_SAFE; a test checks requests builds the same URL from it and it means what ``params``
        mean) and only the short path goes through its parser.

        Our own session is merged into the request as ``Session.prepare_request`` merges it (its
        headers under ours, its cookies, auth, params and hooks; trust_env is off, so no netrc), by
        ``PreparedRequest.prepare`` directly: prepare_request's merging costs ≈45-60 µs more per call
        on Python 3.11 (typing-Protocol isinstance checks in requests' merge_setting). A caller's session goes through it.
        """
        if self._own_session:
            session = self.session
            merged = CaseInsensitiveDict(session.headers)
            merged.update(headers)
            # PreparedRequest.prepare, step by step, leaving out what cannot apply to our session:
            # no Cookie header work while the jar is empty, no auth work without auth or userinfo.
            prepared = requests.PreparedRequest()
            prepared.prepare_method(method)
            prepared.prepare_url(url, session.params or None)
            prepared.prepare_headers({k: v for k, v in merged.items() if v is not None})
            jar = merge_cookies(RequestsCookieJar(), session.cookies)
            if len(jar):
                prepared.prepare_cookies(jar)
            else:
                prepared._cookies = jar
            prepared.prepare_body(data, None, None)
            if session.auth is not None or "@" in url:
                prepared.prepare_auth(session.auth, url)
            prepared.prepare_hooks(session.hooks)
        else:
            prepared = self.session.prepare_request(requests.Request(method, url, data=data, headers=headers))
        query = encode_params(params)
        if query:
            prepared.url += ("&" if "?" in prepared.url else "?") + query
        return prepared

    def _fatal(self, method: str, where: str, response: requests.Response) -> Exception:
        status = response.status_code
        text = _response_outcome(response)
        suffix = f": {text}" if text else ""
        if status in (404, 410):
            log.info("%s %s: HTTP %d", method, where, status)  # routine: an unknown id
            return UpstreamNotFound(f"{method} {where}: not found at the hospital FHIR server "
                                    f"(HTTP {status}){suffix}", details=text or None)
        log.warning("%s %s: HTTP %d", method, where, status)
        if status in (401, 403):
            return UpstreamError(f"{method} {where}: the hospital FHIR server refused our "
                                 f"credentials (HTTP {status}){suffix}", temporary=False,
                                 upstream_status=status, details=text or None)
        return UpstreamError(f"{method} {where}: the hospital FHIR server answered HTTP "
                             f"{status}{suffix}", temporary=False, upstream_status=status,
                             details=text or None)

    def _not_json(self, method: str, where: str, failure: _Temporary, attempts: int,
                  quiet: bool = False) -> Exception:
        """A complete answer that was not JSON, twice: not retried further (``where`` has no query)."""
        status = failure.response.status_code if failure.response is not None else None
        log.log(logging.INFO if quiet else logging.ERROR, "%s %s: giving up after %d attempt(s): %s, the second time",
                method, where, attempts, failure.reason)
        return UpstreamError(f"{method} {where}: the hospital FHIR server answered {failure.reason}, the "
                             f"second time (after {attempts} attempt(s)); not retried further", temporary=False,
                             upstream_status=status)

    def _exhausted(self, method: str, where: str, failure: _Temporary, attempts: int,
                   quiet: bool = False) -> Exception:
        response = failure.response
        status = response.status_code if response is not None else None
        text = _response_outcome(response) if response is not None else ""
        suffix = f": {text}" if text else ""
        message = (f"{method} {where}: the hospital FHIR server failed after "
                   f"{attempts} attempt(s) ({failure.reason}){suffix}")
        log.log(logging.INFO if quiet else logging.ERROR, "%s %s: giving up after %d attempt(s) (%s)", method, where,
                attempts, failure.reason)
        cls = UpstreamTimeout if failure.timeout else UpstreamError
        return cls(message, temporary=True, upstream_status=status, details=text or None,
                   retry_after=_retry_after(response))
