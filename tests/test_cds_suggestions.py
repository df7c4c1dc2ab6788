"""CDS Hooks feedback accepts only suggestions the card offered: the suggestion uuids are stored with the
issued card (migration 0009), covered by its row's sha256 in the audit trail; cards issued before keep
accepting any well-formed uuid, and their rows keep verifying."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
from alembic import command
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import MetaData, Table, select
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Connection

from fhir_ai.cli import main
from fhir_ai.fhir import times
from fhir_ai.store.actors import LOCAL
from fhir_ai.store.audit import CARD_EVENT_SYSTEM, Access, Chain, Entity, sha256_of
from fhir_ai.store.engine import alembic_config, migrate
from fhir_ai.store.searching import utc

from test_cds_hooks import (call, ehr_server_allowed, full_prefetch, hook_request, record,  # noqa: F401
                            the_card)

FEEDBACK = "/cds-services/deterioration/feedback"
BEFORE = "0008_job_item_claims"


@pytest.fixture
def settings_overrides(settings_overrides: dict[str, Any]) -> dict[str, Any]:
    settings_overrides["cds_require_jwt"] = False     # as in test_cds_hooks.py
    return settings_overrides


def issue(client: FlaskClient, record: dict[str, Any]) -> dict[str, Any]:  # noqa: F811
    return the_card(call(client, hook_request(record, prefetch=full_prefetch(record), server=False)))


def accepted(card: str, *suggestions: str) -> dict[str, Any]:
    return {"card": card, "outcome": "accepted", "outcomeTimestamp": "2026-11-28T10:00:00Z",
            "acceptedSuggestions": [{"id": s} for s in suggestions]}


def events(client: FlaskClient) -> list[dict[str, Any]]:
    return client.get("/audit/cds-cards").json["events"]


def verify(runner: Any) -> Any:
    return runner.invoke(main, ["audit", "verify", "--no-progress"])


def test_only_a_suggestion_the_card_offered_can_be_accepted(client: FlaskClient, record: dict[str, Any]) -> None:  # noqa: F811
    card = issue(client, record)
    other = issue(client, record)                   # the same patient's next card: its suggestion is not this one's
    offered = card["suggestions"][0]["uuid"]
    assert [e["suggestions"] for e in events(client)] == [[offered], [other["suggestions"][0]["uuid"]]]
    # the uuid as the spec's model allows it too (implied 'urn:uuid:' prefix, any case)
    response = client.post(FEEDBACK, json={"feedback": [accepted(card["uuid"], f"urn:uuid:{offered.upper()}")]})
    assert response.status_code == 200, response.json
    stored = events(client)
    assert [(e["event"], e.get("acceptedSuggestions")) for e in stored[2:]] == [("accepted", [offered])]
    for wrong in (other["suggestions"][0]["uuid"], str(uuid.uuid4())):
        body = {"feedback": [accepted(other["uuid"], other["suggestions"][0]["uuid"]),
                             accepted(card["uuid"], offered, wrong)]}
        response = client.post(FEEDBACK, json=body)
        assert response.status_code == 422, response.json
        issue_ = response.json["issue"][0]
        assert issue_["code"] == "not-found" and issue_["expression"] == ["feedback[1].acceptedSuggestions[1].id"]
        assert issue_["diagnostics"] == f"card {card['uuid']} offered no suggestion {wrong}"
        assert events(client) == stored             # all or nothing: not even the first, right, entry


def test_an_overridden_cards_accepted_suggestions_are_ignored(client: FlaskClient, record: dict[str, Any]) -> None:  # noqa: F811
    """2.0.1 requires acceptedSuggestions only for 'accepted' and forbids them nowhere: an 'overridden' entry
    carrying some (even a suggestion the card never had) is stored, without them."""
    card = issue(client, record)
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-28T10:00:00Z",
            "acceptedSuggestions": [{"id": str(uuid.uuid4())}]}
    assert client.post(FEEDBACK, json={"feedback": [item]}).status_code == 200
    (overridden,) = [e for e in events(client) if e["event"] == "overridden"]
    assert "acceptedSuggestions" not in overridden


def test_verify_finds_a_cards_suggestions_altered(app: Flask, client: FlaskClient, record: dict[str, Any],  # noqa: F811
                                                  runner: Any) -> None:
    card = issue(client, record)
    assert client.post(FEEDBACK, json={"feedback": [accepted(card["uuid"], card["suggestions"][0]["uuid"])]}) \
        .status_code == 200
    result = verify(runner)
    assert result.exit_code == 0 and "2 CDS card events checked" in result.output, result.output
    engine = app.extensions["fhir_ai"].store.engine
    with engine.connect() as connection:
        row_id, kept = connection.execute(sql_text(
            "SELECT id, suggestions FROM cds_card_event WHERE event = 'issued'")).one()
    # Another suggestion put in (so that some other id would be accepted), or the list cleared (so that any
    # would): each differs from what the trail recorded, though a NULL is left out of the row's sha256.
    for value in (json.dumps([str(uuid.uuid4())]), None):
        with engine.begin() as connection:
            connection.execute(sql_text("UPDATE cds_card_event SET suggestions = :v WHERE id = :id"),
                               {"v": value, "id": row_id})
        result = verify(runner)
        assert result.exit_code == 1, result.output
        assert f"CDS card event {row_id}: content differs from what the audit trail recorded (altered)" \
            in result.output
        with engine.begin() as connection:
            connection.execute(sql_text("UPDATE cds_card_event SET suggestions = :v WHERE id = :id"),
                               {"v": kept, "id": row_id})
        assert verify(runner).exit_code == 0


def _issue_before_0009(connection: Connection, card: str) -> None:
    """A card issued by the version before 0009: its row (no suggestions column yet) and the AuditEvent
    recording it with the sha256 row_digest then gave, over every column the table had."""
    table = Table("cds_card_event", MetaData(), autoload_with=connection)
    assert "suggestions" not in table.c
    now = datetime(2026, 11, 27, 9, 0, tzinfo=timezone.utc)
    chain = Chain(connection)
    row_id = connection.execute(table.insert().values(
        event="issued", service_id="deterioration", card_uuid=card, hook_instance=str(uuid.uuid4()),
        patient_id="p-old", assessment_id="a-old", model_id="deterioration", model_version="1.0",
        indicator="warning", received_at=now)).inserted_primary_key[0]
    row = connection.execute(select(table).where(table.c.id == row_id)).one()._mapping
    values = {str(column.name): row[column] for column in table.c}     # (reflected names are a str subclass)
    digest = sha256_of({key: times.format_datetime(utc(value)) if isinstance(value, datetime) else value
                        for key, value in values.items()})
    chain.append(Access("C", "create", operation="cds-hooks", description="CDS service deterioration: 1 card(s) "
                        "issued", entities=[Entity(str(row_id), digest, CARD_EVENT_SYSTEM), Entity("Patient/p-old")]),
                 LOCAL, now)
    chain.close()


def test_cards_issued_before_0009_still_verify_and_accept_any_suggestion(
        app: Flask, client: FlaskClient, record: dict[str, Any], runner: Any) -> None:  # noqa: F811
    engine = app.extensions["fhir_ai"].store.engine
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), BEFORE)
    old = str(uuid.uuid4())
    with engine.begin() as connection:
        _issue_before_0009(connection, old)
    migrate(engine)                                   # the upgrade: 0009 adds the column, NULL for the old row
    result = verify(runner)
    assert result.exit_code == 0 and "1 CDS card events checked" in result.output, result.output
    (issued,) = events(client)
    assert "suggestions" not in issued
    # Nothing tells the old card's suggestion from any other: any well-formed uuid is taken, as before.
    response = client.post(FEEDBACK, json={"feedback": [accepted(old, str(uuid.uuid4()))]})
    assert response.status_code == 200, response.json
    # A card issued now is checked, and rows old and new verify side by side.
    card = issue(client, record)
    refused = client.post(FEEDBACK, json={"feedback": [accepted(card["uuid"], str(uuid.uuid4()))]})
    assert refused.status_code == 422 and refused.json["issue"][0]["expression"] == \
        ["feedback[0].acceptedSuggestions[0].id"]
    result = verify(runner)
    assert result.exit_code == 0 and "3 CDS card events checked" in result.output, result.output


def test_no_downgrade_below_0009_once_suggestions_are_recorded(
        app: Flask, client: FlaskClient, record: dict[str, Any], runner: Any) -> None:  # noqa: F811
    # The trail's digests cover the recorded suggestions: dropping the column would make every such card
    # "altered" for good, so the downgrade refuses and leaves the schema as it was.
    issue(client, record)
    engine = app.extensions["fhir_ai"].store.engine
    with pytest.raises(RuntimeError, match="cannot downgrade below 0009_card_suggestions: 1 issued card"):
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), BEFORE)
    assert [len(e["suggestions"]) for e in events(client)] == [1]
    result = verify(runner)
    assert result.exit_code == 0 and "1 CDS card events checked" in result.output, result.output


@pytest.mark.parametrize("where", ["card", "suggestion"])
def test_a_uuid_with_a_trailing_newline_is_malformed_not_unknown(client: FlaskClient, record: dict[str, Any],  # noqa: F811
                                                                where: str) -> None:
    """'<uuid>\\n' is no uuid: 400 naming the path, as for any malformed id (not a 422 saying the card offered
    no such suggestion, or issued no such card), and nothing stored."""
    card = issue(client, record)
    item = accepted(card["uuid"], card["suggestions"][0]["uuid"])
    if where == "card":
        item["card"] += "\n"
        path = "feedback[0].card"
    else:
        item["acceptedSuggestions"][0]["id"] += "\n"
        path = "feedback[0].acceptedSuggestions[0].id"
    response = client.post(FEEDBACK, json={"feedback": [item]})
    assert response.status_code == 400, response.json
    issue_ = response.json["issue"][0]
    assert issue_["code"] == "invalid" and issue_["expression"] == [path]
    assert [e["event"] for e in events(client)] == ["issued"]
