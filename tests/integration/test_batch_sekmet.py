"""A patient's record in one batch against the real sekmet FHIR server: its CapabilityStatement lists batch,
so ``auto`` batches; the batch finds the very record the separate requests find, over several pages."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from fhir_ai.config import DEFAULT_MAPPINGS
from fhir_ai.errors import UpstreamNotFound
from fhir_ai.mapping import load_directory

try:
    from .sekmet import SekmetServer
    from .test_post_search import Recorded
    from ..factories import encounter, observation, patient, sepsis_observations
except ImportError:
    from sekmet import SekmetServer  # type: ignore[no-redef]
    from test_post_search import Recorded  # type: ignore[no-redef]
    from factories import encounter, observation, patient, sepsis_observations  # type: ignore[no-redef]

pytestmark = pytest.mark.integration


def test_one_batch_reads_what_separate_requests_read(sekmet: SekmetServer) -> None:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    chart = patient()
    pid = chart["id"]
    visit = encounter(pid)
    wanted = sepsis_observations(pid, visit["id"], last=now - timedelta(minutes=10))
    # more heart rates than one page of _count=200 holds
    wanted += [observation(pid, "8867-4", 80 + i % 20, "/min", now - timedelta(hours=20, minutes=i))
               for i in range(230)]
    unwanted = [observation(pid, "0000-0", 1, "1", now - timedelta(hours=1)),         # a code not asked for
                observation(pid, "8867-4", 99, "/min", now - timedelta(days=5)),      # before the window
                observation(pid, "8867-4", 99, "/min", now + timedelta(hours=1))]     # after until
    someone_else = patient()
    sekmet.load([chart, visit, *wanted, *unwanted, someone_else,
                 encounter(someone_else["id"]),
                 observation(someone_else["id"], "8867-4", 99, "/min", now - timedelta(hours=1))])
    codes = list(load_directory(DEFAULT_MAPPINGS)["deterioration"].query_codes())
    since, until = now - timedelta(days=2), now

    # auto: sekmet's CapabilityStatement decides
    batched, separate = Recorded(sekmet.base_url, by_post=True, batch=None), Recorded(sekmet.base_url, by_post=True)
    try:
        # the first batch answer is checked: read by the separate requests too, and found the same
        batched.record(pid, codes, since=since, until=until)
        assert batched.batch is True and batched.batch_checked
        paths = [(method, path) for method, path, _ in batched.sent]
        assert paths[:2] == [("GET", "/fhir/metadata"), ("POST", "/fhir")]
        assert ("GET", f"/fhir/Patient/{pid}") in paths and ("POST", "/fhir/Observation/_search") in paths

        batched.sent.clear()
        by_batch = batched.record(pid, codes, since=since, until=until)      # trusted now: the batch alone
        by_requests = separate.record(pid, codes, since=since, until=until)
        assert [r["id"] for r in by_batch[:2]] == [pid, visit["id"]]
        assert sorted(o["id"] for o in by_batch[2:]) == sorted(o["id"] for o in wanted)
        key = lambda r: (r["resourceType"], r["id"])  # noqa: E731
        assert sorted(by_batch, key=key) == sorted(by_requests, key=key)
        first, *pages = batched.sent
        assert first[:2] == ("POST", "/fhir")
        assert pages and {method for method, _, _ in pages} == {"GET"}      # the Observations' next pages
        assert [method for method, _, _ in separate.sent][:3] == ["GET", "GET", "POST"]

        batched.sent.clear()
        with pytest.raises(UpstreamNotFound, match=r"GET /fhir/Patient/not-there"):
            batched.record("not-there", codes, since=since, until=until)
        assert [(method, path) for method, path, _ in batched.sent] == [("POST", "/fhir"),
                                                                        ("GET", "/fhir/Patient/not-there")]
        assert batched.batch is True                  # an unknown patient is no refusal of the batch
    finally:
        batched.close()
        separate.close()
