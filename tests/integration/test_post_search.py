"""The Observation search against the real sekmet FHIR server: one POST _search (sekmet takes it) finds
the very Observations the GET form found before, over several pages."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from fhir_ai.config import DEFAULT_MAPPINGS
from fhir_ai.errors import UpstreamNotFound
from fhir_ai.fhir.client import FhirClient
from fhir_ai.fhir.sources import ServerSource
from fhir_ai.mapping import load_directory

try:
    from .sekmet import SekmetServer
    from ..factories import observation, patient, sepsis_observations
except ImportError:
    from sekmet import SekmetServer  # type: ignore[no-redef]
    from factories import observation, patient, sepsis_observations  # type: ignore[no-redef]

pytestmark = pytest.mark.integration


class Recorded(ServerSource):
    """A ServerSource whose session notes each request it sent (method, path, form or query)."""

    def __init__(self, base_url: str, *, by_post: bool, batch: bool | None = False) -> None:
        super().__init__(FhirClient(base_url, retries=0), batch=batch)
        self.search_by_post = by_post
        self.sent: list[tuple[str, str, dict[str, list[str]]]] = []
        self.client.session.hooks["response"].append(self._note)

    def _note(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        request = response.request
        parts = urlsplit(request.url)
        text = request.body.decode() if request.method == "POST" else parts.query
        self.sent.append((request.method, parts.path, parse_qs(text)))


@pytest.fixture
def sources(sekmet: SekmetServer) -> Iterator[tuple[Recorded, Recorded]]:
    by_post, by_get = Recorded(sekmet.base_url, by_post=True), Recorded(sekmet.base_url, by_post=False)
    yield by_post, by_get
    by_post.close()
    by_get.close()


def test_post_search_finds_what_the_get_search_found(sekmet: SekmetServer,
                                                     sources: tuple[Recorded, Recorded]) -> None:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    chart = patient()
    pid = chart["id"]
    wanted = sepsis_observations(pid, "enc-none", last=now - timedelta(minutes=10))
    # 230 more heart rates: more than one page of _count=200, whatever the form of the search
    wanted += [observation(pid, "8867-4", 80 + i % 20, "/min", now - timedelta(hours=20, minutes=i))
               for i in range(230)]
    unwanted = [observation(pid, "0000-0", 1, "1", now - timedelta(hours=1)),          # a code not asked for
                observation(pid, "8867-4", 99, "/min", now - timedelta(days=5)),       # before the window
                observation(pid, "8867-4", 99, "/min", now + timedelta(hours=1))]      # after as_of
    other = observation(patient()["id"], "8867-4", 99, "/min", now - timedelta(hours=1))
    sekmet.load([chart, *wanted, *unwanted, other])
    codes = list(load_directory(DEFAULT_MAPPINGS)["deterioration"].query_codes())
    since, until = now - timedelta(days=2), now

    by_post, by_get = sources
    found_by_post = by_post.observations(pid, codes, since=since, until=until)
    found_by_get = by_get.observations(pid, codes, since=since, until=until)

    assert sorted(o["id"] for o in found_by_post) == sorted(o["id"] for o in wanted)
    assert sorted(o["id"] for o in found_by_get) == sorted(o["id"] for o in wanted)
    assert sorted(found_by_post, key=lambda o: o["id"]) == sorted(found_by_get, key=lambda o: o["id"])
    # sekmet takes POST _search: one POST with every code, then its next links by GET; no refusal
    assert by_post.search_by_post
    first, *pages = by_post.sent
    assert first[:2] == ("POST", "/fhir/Observation/_search") and len(first[2]["code"][0].split(",")) == len(codes)
    assert pages and {method for method, _, _ in pages} == {"GET"}
    # the GET form: split under MAX_URL as before, each split paged
    searches = [query for method, _, query in by_get.sent if method == "GET" and "code" in query
                and "_offset" not in query]
    assert {method for method, _, _ in by_get.sent} == {"GET"}
    assert sum(len(query["code"][0].split(",")) for query in searches) == len(codes)


def test_refused_post_search_falls_back_to_get(sekmet: SekmetServer) -> None:
    """sekmet answers a POST to an unknown resource type's _search with 404: the source searches by
    GET, which gives sekmet's own 404, and so does not take POST for refused (it asks again next time)."""
    source = Recorded(sekmet.base_url, by_post=True)
    try:
        with pytest.raises(UpstreamNotFound, match=r"GET /\S*NotAType"):
            source._search_codes("NotAType", "patient=x", (("http://loinc.org", "8867-4"),))
        assert [(method, path) for method, path, _ in source.sent] == [("POST", "/fhir/NotAType/_search"),
                                                                       ("GET", "/fhir/NotAType")]
        assert source.search_by_post
    finally:
        source.close()

