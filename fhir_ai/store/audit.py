"""AuditEvent resources and the hash chain that makes the trail tamper-evident.

Each event's ``hash`` is sha256 over its position, the previous event's hash and its canonical JSON;
the chain head (one row) is locked first by every writing transaction, so events, assessments and
Provenance are appended in one order and a write and its audit row share a transaction.
"""
from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable

import orjson
from sqlalchemy.engine import Connection

from .. import codes
from ..fhir import times
from . import indexing, rawsql, writer_lock
from .actors import Actor
from .provenance import ROLE_SYSTEM, client_reference, user_agent
from .searching import utc
from .trail_tables import AuditEventRow, ChainHeadRow, ProvenanceEntityRow, SearchIndexRow

GENESIS = "0" * 64
CHAIN_EXTENSION = f"{codes.BASE}/StructureDefinition/audit-chain"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
OPERATION = f"{codes.BASE}/OperationDefinition"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
NETWORK_IP = "2"
OUTCOMES = {"0": "success", "4": "minor failure", "8": "serious failure", "12": "major failure"}


@dataclass(frozen=True)
class Entity:
    """A resource an event is about; ``sha256`` of the stored JSON when the event wrote it. With ``system``,
    a record that is no FHIR resource (a CDS card event), named by identifier: ``reference`` is its value."""
    reference: str
    sha256: str | None = None
    system: str | None = None


CARD_EVENT_SYSTEM = "https://fhir-ai.invalid/cds-card-event"     # identifiers of cds_card_event rows (their id)


def row_digest(row: Any) -> str:
    """sha256 of a table row's columns (canonical JSON, times as FHIR instants): what an event records of a
    record that is no FHIR resource, so ``audit verify`` can tell it was altered. A column added after rows were
    first recorded is marked ``info={"digest_omits_null": True}``: left out while NULL, so the rows stored before
    it keep the sha256 their events recorded, and a value set later (or a recorded one cleared) still differs."""
    values = {}
    for column in row.__table__.columns:
        value = getattr(row, column.key)
        if value is None and column.info.get("digest_omits_null"):
            continue
        if isinstance(value, datetime):      # SQLite hands back naive UTC, PostgreSQL aware: one text for both
            value = times.format_datetime(utc(value))
        values[column.key] = value
    return hashlib.sha256(canonical(values)).hexdigest()


@dataclass
class Access:
    """What happened, as the API layer or the store describes it; becomes one AuditEvent."""
    action: str                               # C R U D E
    interaction: str                          # http://hl7.org/fhir/restful-interaction code
    outcome: str = "0"                        # 0 success, 4 minor failure, 8 serious, 12 major
    description: str | None = None
    entities: list[Entity] = field(default_factory=list)
    query: str | None = None                  # the query string of a search
    operation: str | None = None              # e.g. "assess"
    actor: Actor | None = None


def outcome_for_status(status: int) -> str:
    return "0" if status < 400 else "4" if status < 500 else "8"


def canonical(resource: dict[str, Any]) -> bytes:
    return orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)


def sha256_of(resource: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(resource)).hexdigest()


def link_hash(seq: int, prev_hash: str, resource: dict[str, Any]) -> str:
    """The hash of one link: position, previous hash and the event without its chain extension."""
    unchained = without_chain(resource) if "extension" in resource else resource
    return hashlib.sha256(f"{seq}\n{prev_hash}\n".encode() + canonical(unchained)).hexdigest()


def without_chain(resource: dict[str, Any]) -> dict[str, Any]:
    extensions = [e for e in resource.get("extension") or [] if e.get("url") != CHAIN_EXTENSION]
    out = {k: v for k, v in resource.items() if k != "extension"}
    if extensions:
        out["extension"] = extensions
    return out


def chain_values(resource: dict[str, Any]) -> dict[str, Any]:
    for extension in resource.get("extension") or []:
        if extension.get("url") == CHAIN_EXTENSION:
            return {part["url"]: next(v for k, v in part.items() if k.startswith("value"))
                    for part in extension.get("extension") or []}
    return {}


def build_event(access: Access, actor: Actor, recorded: datetime) -> dict[str, Any]:
    subtype = [{"system": RESTFUL, "code": access.interaction}]
    if access.operation:
        subtype.append({"system": OPERATION, "code": access.operation})
    agent: dict[str, Any] = {
        "type": {"text": actor.kind},
        "who": client_reference(actor),
        "role": [{"coding": [{"system": ROLE_SYSTEM, "code": actor.role}]}],
        "requestor": True,
    }
    if actor.address:
        agent["network"] = {"address": actor.address, "type": NETWORK_IP}
    agents = [agent]
    if actor.user:
        # The user the caller says is acting initiated the event (requestor); the caller, first, stays the
        # agent that authenticated (its identifier, role and address). FHIR: only one agent is the requestor.
        agent["requestor"] = False
        agents.append({**user_agent(actor), "requestor": True})   # the same agent as its Provenance names
    entities: list[dict[str, Any]] = []
    for entity in access.entities:
        is_patient = entity.system is None and entity.reference.startswith("Patient/")
        item: dict[str, Any] = {
            "what": ({"identifier": {"system": entity.system, "value": entity.reference}} if entity.system
                     else {"reference": entity.reference}),
            "type": {"system": ENTITY_TYPE, "code": "1" if is_patient else "2"},
            "role": {"system": OBJECT_ROLE, "code": "1" if is_patient else "4"}}
        if entity.sha256:
            item["detail"] = [{"type": "sha256", "valueString": entity.sha256}]
        entities.append(item)
    if access.query is not None:
        entities.append({"type": {"system": ENTITY_TYPE, "code": "2"}, "role": {"system": OBJECT_ROLE, "code": "24"},
                         "query": base64.b64encode(access.query.encode()).decode()})
    stamp = times.format_datetime(recorded)
    event: dict[str, Any] = {
        "resourceType": "AuditEvent", "id": uuid.uuid4().hex,
        "meta": {"versionId": "1", "lastUpdated": stamp},
        "type": {"system": EVENT_TYPE, "code": "rest", "display": "RESTful Operation"},
        "subtype": subtype, "action": access.action, "recorded": stamp,
        "outcome": access.outcome, "agent": agents,
        "source": {"observer": {"display": "fhir_ai"}, "type": [{"system": SOURCE_TYPE, "code": "4"}]},
    }
    if access.description:
        event["outcomeDesc"] = access.description
    if entities:
        event["entity"] = entities
    return event


_INDEX_INSERT = rawsql.Insert(SearchIndexRow.__table__,
                              ("resource_type", "resource_id", "resource_seq", "param", "system", "code",
                               "number"))
_ENTITY_INSERT = rawsql.Insert(ProvenanceEntityRow.__table__, ("provenance_seq", "reference_id", "reference_type"))
_EVENT_INSERT = rawsql.Insert(AuditEventRow.__table__, ("seq", "id", "recorded", "action", "outcome", "agent",
                                                       "role", "prev_hash", "hash", "resource"))
_LOCK_HEAD = f"UPDATE {ChainHeadRow.__tablename__} SET seq = seq WHERE id = 1 RETURNING seq, hash"
_MOVE_HEAD = f"UPDATE {ChainHeadRow.__tablename__} SET seq = {{}}, hash = {{}} WHERE id = 1"


class Chain:
    """The audit chain inside one transaction: lock the head first, append, then ``close()``.

    ``connection`` is the transaction's Connection (``session.connection()`` in an ORM session).
    Events and search index rows (``index``: also those of the other resources the transaction
    writes, and ``entities``: a Provenance's entity keys) are buffered and inserted by ``close()``, one
    INSERT per table (``rawsql.Insert``).
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        writer_lock.acquire(connection)     # SQLite: queue in the kernel, not by SQLite's busy sleeps
        # A no-op UPDATE takes the row lock (PostgreSQL) / the write lock (SQLite) before anything
        # is read, so concurrent writers queue here instead of forking the chain.
        row = rawsql.run(connection, _LOCK_HEAD)[0]
        self.seq, self.hash = int(row[0]), str(row[1])
        self._events: list[tuple[Any, ...]] = []
        self._index: list[tuple[Any, ...]] = []
        self._entities: list[tuple[Any, ...]] = []

    def index(self, resource_type: str, resource_id: str, seq: int, entries: list[indexing.Entry]) -> None:
        """Buffer the search index rows of a resource this transaction writes (``seq``: its row's)."""
        self._index += [(resource_type, resource_id, seq, *entry) for entry in entries]

    def entities(self, seq: int, keys: list[indexing.EntityKey]) -> None:
        """Buffer the entity keys of a Provenance this transaction writes (``seq``: its row's)."""
        self._entities += [(seq, *key) for key in keys]

    def append(self, access: Access, actor: Actor, recorded: datetime) -> dict[str, Any]:
        event = build_event(access, actor, recorded)
        seq = self.seq + 1
        digest = link_hash(seq, self.hash, event)
        event["extension"] = [{"url": CHAIN_EXTENSION, "extension": [
            {"url": "sequence", "valueString": str(seq)}, {"url": "previous", "valueString": self.hash},
            {"url": "hash", "valueString": digest}]}]
        self._events.append((seq, event["id"], recorded, access.action, access.outcome, actor.client_id[:256],
                             actor.role[:64], self.hash, digest, orjson.dumps(event).decode()))
        self.index("AuditEvent", event["id"], seq, indexing.audit_event(event))
        self.seq, self.hash = seq, digest
        return event

    def close(self, rows: Iterable[tuple[rawsql.Insert, list[tuple[Any, ...]]]] = ()) -> None:
        """Insert ``rows`` (the transaction's other rows, in that order) and what was buffered, and move
        the head (the caller's transaction commits). On PostgreSQL all of it is one statement."""
        move = None
        if self._events:
            move = (rawsql.statement(self.connection, _MOVE_HEAD, 1, 1), (self.seq, self.hash))
        rawsql.insert_all(self.connection, [*rows, (_EVENT_INSERT, self._events), (_INDEX_INSERT, self._index),
                                            (_ENTITY_INSERT, self._entities)], then=move)
        self._events, self._index, self._entities = [], [], []
