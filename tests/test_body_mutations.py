"""Every JSON value of a valid request body swapped for values of other JSON types (null, numbers, strings,
arrays, objects): each answer is an OperationOutcome-bearing 4xx or a success, never a 5xx other than the
upstream's (502/503/504) — bad input is named, never a stack trace."""
from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterator
from typing import Any

try:
    from .test_cds_hooks import full_prefetch, hook_request, record, spec  # noqa: F401
    from .test_push import demo_record, parameters
    from .test_subscriptions import SECRET, heart_rate, notification, queued, sc, sub_app  # noqa: F401
except ImportError:
    from test_cds_hooks import full_prefetch, hook_request, record, spec  # type: ignore[no-redef]  # noqa: F401
    from test_push import demo_record, parameters  # type: ignore[no-redef]
    from test_subscriptions import SECRET, heart_rate, notification, queued, sc, sub_app  # type: ignore[no-redef]  # noqa: F401

MUTANTS: list[Any] = [None, 1, -1.5, "x", "", [], {}, ["x"], {"x": 1}, True, [None], [[]], [{}]]


def paths(value: Any, prefix: tuple[Any, ...] = (), depth: int = 7) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if depth and isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, prefix + (key,), depth - 1)
    elif depth and isinstance(value, list):
        for i, item in enumerate(value[:3]):
            yield from paths(item, prefix + (i,), depth - 1)


def mutated(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    out = copy.deepcopy(body)
    here = out
    for step in path[:-1]:
        here = here[step]
    here[path[-1]] = value
    return out


def server_errors(post: Callable[[Any], Any], body: Any,
                  skip: Callable[[tuple[Any, ...]], bool] = lambda path: False) -> list[tuple[str, Any, int]]:
    bad = []
    for path in list(paths(body)):
        if skip(path):
            continue
        for value in MUTANTS:
            answer = post(mutated(body, path, value))
            if answer.status_code >= 500 and answer.status_code not in (502, 503, 504):
                bad.append((".".join(map(str, path)), value, answer.status_code))
            elif answer.status_code >= 400:
                assert answer.get_json()["resourceType"] == "OperationOutcome", (path, value)
    return bad


def test_push_assess_bodies(client) -> None:
    resources = demo_record()
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    body = parameters([r for r in resources if r["resourceType"] != "Observation"] + observations[:2])
    assert server_errors(lambda b: client.post("/$assess", json=b, headers={"Content-Type": "application/fhir+json"}),
                         body) == []


def test_pull_assess_parameters(client) -> None:
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "asOf", "valueDateTime": "2026-11-20T08:00:00Z"}, {"name": "model", "valueCode": "deterioration"},
        {"name": "encounter", "valueReference": {"reference": "Encounter/demo-enc-005"}},
        {"name": "writeBack", "valueBoolean": False}]}
    assert server_errors(lambda b: client.post("/Patient/demo-005/$assess", json=b,
                                               headers={"Content-Type": "application/fhir+json"}), body) == []


def test_subscription_notification_bodies(sc, queued) -> None:  # noqa: F811
    body = notification("event-notification", [heart_rate("p1")])
    assert server_errors(lambda b: sc.post("/subscriptions/notify", json=b,
                                           headers={"Authorization": f"Bearer {SECRET}"}), body) == []
