"""CDS Hooks feedback: check it (spec 2.0.1, invariants cds-fb-1..3, suggestions the card offered), turn it into audit rows.

Feedback is history, not state: 2.0.1 says a card "once ignored could later be acted upon", that a service
"may receive feedback for the same card instance multiple times" and that clients "should faithfully report
each of these distinct end-user interactions". So a card accepted and later overridden (or the reverse) keeps
both entries, in the order received; nothing is refused as a conflict (no 409).
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from ..errors import BadRequest, Unprocessable
from ..fhir import times

OUTCOMES = ("accepted", "overridden")


class UnknownCard(Unprocessable):
    """Feedback names a card this service did not issue (to this EHR). 2.0.1 sets no status for it: 422, the
    body is well-formed but cannot be applied (a 404 would say the feedback endpoint itself is missing)."""
    code = "not-found"


class UnknownSuggestion(Unprocessable):
    """An 'accepted' entry names a suggestion its card did not offer: 2.0.1's acceptedSuggestions[].id is "the
    card.suggestion.uuid from the CDS Hooks response". 422 like UnknownCard: well-formed, cannot be applied."""
    code = "not-found"


_UUID = re.compile(r"(urn:uuid:)?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _uuid(value: Any, path: str) -> str:
    # fullmatch: '$' would also match before a trailing newline, and such an id, taken, names no card or
    # suggestion (a 422 "not offered" for what is a malformed request)
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise BadRequest("must be a card/suggestion uuid", expression=path)
    return value.removeprefix("urn:uuid:").lower()


def _timestamp(value: Any, path: str) -> datetime:
    if not isinstance(value, str) or "T" not in value:
        raise BadRequest("outcomeTimestamp must be an ISO 8601 date-time in UTC", expression=path)
    try:
        return times.parse_datetime(value)
    except ValueError as exc:
        raise BadRequest(f"outcomeTimestamp: {exc}", expression=path) from exc


def parse(body: Any) -> list[dict[str, Any]]:
    """One audit row (store.add_card_events) per feedback entry; BadRequest names the offending path."""
    if not isinstance(body, dict) or not isinstance(body.get("feedback"), list):
        raise BadRequest("the body must be an object with a 'feedback' array", expression="feedback")
    rows = []
    for i, item in enumerate(body["feedback"]):
        where = f"feedback[{i}]"
        if not isinstance(item, dict):
            raise BadRequest("each feedback entry must be an object", expression=where)
        outcome = item.get("outcome")
        if outcome not in OUTCOMES:          # cds-fb-1
            raise BadRequest("outcome must be 'accepted' or 'overridden'", expression=f"{where}.outcome")
        row: dict[str, Any] = {"event": outcome, "card_uuid": _uuid(item.get("card"), f"{where}.card"),
                               "outcome_at": _timestamp(item.get("outcomeTimestamp"), f"{where}.outcomeTimestamp")}
        accepted = item.get("acceptedSuggestions")
        if outcome == "accepted":            # cds-fb-2
            if not isinstance(accepted, list) or not accepted:
                raise BadRequest("an 'accepted' outcome needs acceptedSuggestions",
                                 expression=f"{where}.acceptedSuggestions")
            ids = []
            for j, suggestion in enumerate(accepted):
                path = f"{where}.acceptedSuggestions[{j}].id"
                ids.append(_uuid(suggestion.get("id") if isinstance(suggestion, dict) else None, path))
            row["accepted_suggestions"] = json.dumps(ids)
        # An 'overridden' entry's acceptedSuggestions are neither checked nor stored: 2.0.1 requires them only
        # for 'accepted' (cds-fb-2) and forbids them nowhere, and a user who overrode a card accepted nothing.
        reason = item.get("overrideReason")
        if reason is not None:
            path = f"{where}.overrideReason"
            if not isinstance(reason, dict) or not (reason.get("reason") or reason.get("userComment")):  # cds-fb-3
                raise BadRequest("an overrideReason needs a reason, a userComment, or both", expression=path)
            coding = reason.get("reason")
            if coding is not None:
                if not isinstance(coding, dict) or not coding.get("code"):
                    raise BadRequest("overrideReason.reason must be a Coding with a code", expression=f"{path}.reason")
                for key in ("system", "code", "display"):       # stored as sent: strings only (FHIR's types)
                    if coding.get(key) is not None and not isinstance(coding[key], str):
                        raise BadRequest(f"overrideReason.reason.{key} must be a string",
                                         expression=f"{path}.reason.{key}")
                row.update(override_system=(coding.get("system") or None) and coding["system"][:512],
                           override_code=coding["code"][:128],
                           override_display=(coding.get("display") or None) and coding["display"][:512])
            comment = reason.get("userComment")
            if comment is not None:
                if not isinstance(comment, str):
                    raise BadRequest("userComment must be a string", expression=f"{path}.userComment")
                row["user_comment"] = comment[:4000]
        rows.append(row)
    return rows


def check_accepted(row: dict[str, Any], offered: str | None, where: str) -> None:
    """UnknownSuggestion unless every suggestion an 'accepted' entry (a ``parse`` row) names is one of
    ``offered``, the JSON list of uuids recorded with its card when it was issued. A card issued before
    migration 0009 has none recorded (NULL): any well-formed uuid is taken for it, as then, since nothing
    tells the suggestion it offered from any other."""
    if row["event"] != "accepted" or offered is None:
        return
    known = {str(u).removeprefix("urn:uuid:").lower() for u in json.loads(offered)}
    for j, suggestion in enumerate(json.loads(row["accepted_suggestions"])):
        if suggestion not in known:
            raise UnknownSuggestion(f"card {row['card_uuid']} offered no suggestion {suggestion}",
                                    expression=f"{where}.acceptedSuggestions[{j}].id")


def as_json(row: Any) -> dict[str, Any]:
    """An audit row (CdsCardEventRow) as auditors read it."""
    out: dict[str, Any] = {"id": row.id, "event": row.event, "service": row.service_id, "card": row.card_uuid,
                           "receivedAt": _instant(row.received_at)}
    optional = {"hookInstance": row.hook_instance, "patient": row.patient_id, "assessment": row.assessment_id,
                "model": row.model_id, "modelVersion": row.model_version, "indicator": row.indicator,
                "client": row.client, "tenant": row.tenant, "userComment": row.user_comment}
    out.update({k: v for k, v in optional.items() if v is not None})
    if row.outcome_at is not None:
        out["outcomeTimestamp"] = _instant(row.outcome_at)
    if row.override_code is not None:
        out["overrideReason"] = {k: v for k, v in (("system", row.override_system), ("code", row.override_code),
                                                   ("display", row.override_display)) if v is not None}
    if row.accepted_suggestions:
        out["acceptedSuggestions"] = json.loads(row.accepted_suggestions)
    if row.suggestions is not None:         # an issued card's suggestion uuids (none recorded before 0009)
        out["suggestions"] = json.loads(row.suggestions)
    return out


def _instant(dt: datetime) -> str:
    # SQLite hands back naive datetimes; everything is stored in UTC.
    return times.format_datetime(dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc))
