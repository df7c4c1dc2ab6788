"""CDS Hooks 2.0 endpoints: discovery, service calls, feedback, and the auditors' view of cards.

Authentication of service calls and feedback is the EHR's signed JWT (fhir_ai.cds.jwt_verify); this
blueprint does it itself. Discovery carries no patient data and is open.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from flask import Blueprint, current_app, g, jsonify, request

from .. import assessment
from ..cds import feedback, services
from ..cds.cards import CardBuilder, CardSet
from ..cds.i18n import LANGUAGE_EXTENSION, negotiate
from ..cds.jwt_verify import JwtVerifier, Verified, parse_issuers
from ..features.extract import pinned_encounter_problem
from ..cds.patient_data import check_id
from ..cds.prefetch import Gathered, Gatherer
from ..auth.guard import note_entities, refused, set_actor, set_user
from ..auth.policy import requires
from ..config import Settings
from ..errors import BadRequest, FhirAiError, NotFound, Unauthorized
from ..fhir import times
from ..pipeline import Pipeline
from ..search.params import whole_number_param
from ..store.actors import ANONYMOUS, Actor, user_reference
from ..store.audit import Access, Entity, outcome_for_status
from .fhir_io import base_url, fhir_response, request_bytes

log = logging.getLogger(__name__)

bp = Blueprint("cds_hooks", __name__)

_USER = re.compile(r"[\w]+/[\w\-.]+")         # invariant ord-1: {type}/{id} (fullmatch: no trailing newline)
ED_CLASS_CODES = {"EMER"}                    # v3 ActCode: emergency
ACTIVE = ("arrived", "triaged", "in-progress")
MAX_AUDIT_PAGE = 500


def _settings() -> Settings:
    return current_app.config["FHIR_AI"]


def _pipeline() -> Pipeline:
    return current_app.extensions["fhir_ai"]


def _verifier() -> JwtVerifier:
    verifier = current_app.extensions.get("fhir_ai.cds_jwt")
    if verifier is None:
        settings = _settings()
        verifier = JwtVerifier(parse_issuers(settings.cds_issuers), _pipeline().store.use_jti,
                               leeway=settings.cds_jwt_leeway, max_lifetime=settings.cds_jwt_max_lifetime,
                               fetch_timeout=settings.cds_fetch_timeout)
        current_app.extensions["fhir_ai.cds_jwt"] = verifier
    return verifier


def _public_base() -> str:
    return _settings().cds_public_url.rstrip("/") or base_url()


def _authenticate() -> Verified | None:
    """The EHR's JWT, whose aud must be exactly the URL called (behind a proxy: cds_public_url + path).

    The verified issuer becomes the actor of the audit trail for what this request stores.
    """
    if not _settings().cds_require_jwt:
        return None
    public = _settings().cds_public_url.rstrip("/") or _settings().public_url.rstrip("/")
    audience = f"{public}{request.path}" if public else request.base_url
    caller = _verifier().verify(request.headers.get("Authorization"), audience)
    set_actor(caller.issuer, "ehr")
    return caller


def _service(service_id: str) -> services.Service:
    service = services.find(_pipeline().registry, service_id)
    if service is None:
        known = [s.id for s in services.available(_pipeline().registry)]
        raise NotFound(f"no CDS service {service_id!r} here; available: {known}")
    return service


def _json_body() -> dict[str, Any]:
    if request.mimetype and request.mimetype not in ("application/json", "application/fhir+json"):
        raise BadRequest(f"Content-Type {request.mimetype!r}: send application/json")
    try:
        body = orjson.loads(request_bytes() or b"null")
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def check_hook_request(body: dict[str, Any], service: services.Service) -> None:
    """CDSHooksRequest (cds-r-1) and the hook's context model (ord-1, required ids)."""
    if body.get("hook") != service.hook:
        raise BadRequest(f"service {service.id} answers the {service.hook} hook, not {body.get('hook')!r}",
                         expression="hook")
    if not isinstance(body.get("hookInstance"), str) or not body["hookInstance"]:
        raise BadRequest("hookInstance is required", expression="hookInstance")
    context = body.get("context")
    if not isinstance(context, dict):
        raise BadRequest("context is required", expression="context")
    user = context.get("userId")
    if not isinstance(user, str) or not _USER.fullmatch(user):
        raise BadRequest("context.userId must be {type}/{id}", expression="context.userId")
    check_id(context.get("patientId"), "context.patientId")
    if service.requires_encounter() or context.get("encounterId") is not None:
        check_id(context.get("encounterId"), "context.encounterId")
    auth = body.get("fhirAuthorization")
    if auth is not None:
        if not body.get("fhirServer"):
            raise BadRequest("fhirAuthorization needs fhirServer (cds-r-1)", expression="fhirServer")
        if not isinstance(auth, dict) or not isinstance(auth.get("access_token"), str):
            raise BadRequest("fhirAuthorization.access_token is required", expression="fhirAuthorization.access_token")
    server = body.get("fhirServer")
    if server is not None and (not isinstance(server, str) or not server.startswith(("http://", "https://"))):
        raise BadRequest("fhirServer must be an http(s) URL", expression="fhirServer")


def _ed_encounter(gathered: Gathered) -> str | None:
    """The emergency-department encounter an ED-only service assesses: context.encounterId if it is one;
    without encounterId (patient-view), the patient's active ED encounter that started last. None: not ED."""
    encounters = [r for r in gathered.resources if r.get("resourceType") == "Encounter"]
    if gathered.encounter_id:
        encounters = [e for e in encounters if e.get("id") == gathered.encounter_id]
    else:
        encounters = [e for e in encounters if e.get("status") in ACTIVE]
    ed = [e for e in encounters if (e.get("class") or {}).get("code") in ED_CLASS_CODES]
    return max(ed, key=_started).get("id") if ed else None


def _started(encounter: dict[str, Any]) -> float:
    start = (encounter.get("period") or {}).get("start")
    try:
        return times.to_epoch(start) if isinstance(start, str) else float("-inf")
    except ValueError:
        return float("-inf")      # no usable start: any encounter with one is later


@bp.after_request
def _audit_refused_call(response: Any) -> Any:
    """A service call or feedback answered with an error (400, 404, 412, 422, 5xx) is audited too: the EHR
    asked about a patient, and fhir_ai may have read the patient's record before it failed. (401s are
    audited as refusals; a successful call is audited by what it stores.)"""
    if (response.status_code < 400 or g.get("fhir_ai_denied") is not None
            or request.endpoint not in ("cds_hooks.call", "cds_hooks.feedback_post")):
        return response
    patient = g.get("fhir_ai_cds_patient")
    actor = g.get("fhir_ai_actor") or Actor(ANONYMOUS.client_id, ANONYMOUS.role, request.remote_addr, "anonymous")
    _pipeline().store.record_access(Access(
        "E", "operation", outcome_for_status(response.status_code), operation="cds-hooks", actor=actor,
        description=f"{response.status_code} {request.method} {request.path}",
        entities=[Entity(f"Patient/{patient}")] if patient else []))
    return response


@bp.errorhandler(Unauthorized)
def _unauthorized(exc: Unauthorized):  # type: ignore[no-untyped-def]
    log.warning("CDS Hooks call refused: %s", exc.message)
    refused(exc, "operation")         # audited like the API's other 401s
    # The message may quote the token's own header or claims: in the header only printable ASCII, no quotes
    # (a CR, LF or a non-Latin-1 issuer would make the server refuse the whole answer).
    message = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in exc.message)[:300]
    return fhir_response(exc.to_operation_outcome(), 401,
                         headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{message}"'})


@bp.get("/cds-services")
def discovery():  # type: ignore[no-untyped-def]
    return jsonify(services.discovery(_pipeline().registry, assessment.now()))


@bp.post("/cds-services/<service_id>")
def call(service_id: str):  # type: ignore[no-untyped-def]
    service = _service(service_id)
    caller = _authenticate()
    body = _json_body()
    check_hook_request(body, service)
    g.fhir_ai_cds_patient = body["context"]["patientId"]       # for the audit of a call that fails later
    # context.userId recorded (audit trail, Provenance) only as a relative reference of a type the hooks name for
    # the user, with a usable FHIR id; anything else (ord-1 allows more) is neither trusted nor logged.
    if caller is not None and user_reference(body["context"]["userId"]):
        set_user(body["context"]["userId"])     # a signed call only: the EHR vouches for the user it names
    settings, pipeline = _settings(), _pipeline()
    model, mapping = pipeline.registry.get(service.model_id)
    language = negotiate(request.headers.get("Accept-Language"),
                         (body.get("extension") or {}).get(LANGUAGE_EXTENSION) if isinstance(body.get("extension"), dict)
                         else None, settings.cds_language)
    as_of = assessment.now()
    gathered = Gatherer(service, mapping, body, as_of=as_of, timeout=settings.cds_fetch_timeout,
                        allowed_servers=settings.cds_fhir_server_list).gather()
    patient_id = body["context"]["patientId"]
    builder = CardBuilder(model_id=model.model_id, model_version=model.version, mapping=mapping,
                          language=language, base_url=_public_base(), notes=gathered.notes, issues=[],
                          resources_in=gathered.resources)
    # The Gatherer holds context.encounterId's Encounter whenever the hook names one (else it refused).
    pinned = _ed_encounter(gathered) if service.ed_only else gathered.encounter_id
    if service.ed_only and pinned is None:
        cards = builder.not_applicable_card("reason.not_ed")
        # Nothing is stored, but the patient's record was read for the EHR (and its user): audited.
        pipeline.store.record_access(Access(
            "E", "operation", description=f"CDS service {service.id}: not assessed, not an emergency department "
            "encounter", entities=[Entity(f"Patient/{patient_id}")]))
    else:
        # The hook's encounter, unless the assessment now cannot be one of it (it ended, or starts later):
        # then the patient's current encounter is found as $assess finds it without one.
        if pinned is not None and any(r.get("resourceType") == "Encounter" and r.get("id") == pinned
                                      and pinned_encounter_problem(r, as_of.timestamp()) is not None
                                      for r in gathered.resources):
            pinned = None
        result = pipeline.assess(patient_id, models=[service.model_id], as_of=as_of, resources=gathered.resources,
                                 encounter=pinned)
        builder.issues = result.issues
        cards = builder.assessment_cards(result.resources)
        if not cards.cards:   # never "200 with no cards": a clinician would read that as "no risk"
            raise FhirAiError(f"{service.model_id} produced no assessment for this patient")
    _record(cards, service, body, caller, patient_id)
    log.info("CDS %s: %d card(s) for patient %s", service.id, len(cards.cards), patient_id)
    return jsonify({"cards": cards.cards})


def _record(cards: CardSet, service: services.Service, body: dict[str, Any], caller: Verified | None,
            patient_id: str) -> None:
    for event in cards.events:
        event.update(event="issued", service_id=service.id, hook_instance=str(body["hookInstance"])[:128],
                     patient_id=patient_id, client=caller.issuer if caller else None,
                     tenant=caller.tenant if caller else None)
    _pipeline().store.add_card_events(cards.events, description=f"CDS service {service.id}: "
                                      f"{len(cards.events)} card(s) issued")


@bp.post("/cds-services/<service_id>/feedback")
def feedback_post(service_id: str):  # type: ignore[no-untyped-def]
    service = _service(service_id)
    caller = _authenticate()
    rows = feedback.parse(_json_body())
    store = _pipeline().store
    issued = store.issued_cards([row["card_uuid"] for row in rows])
    for i, row in enumerate(rows):
        card = issued.get(row["card_uuid"])
        # Only cards this service issued, to this EHR when it signs its calls; one answer for every case, so
        # that a caller learns nothing of other services' or other EHRs' cards. All or nothing: a refusal
        # stores no entry of the request.
        if card is None or card.service_id != service.id or (caller and card.client and card.client != caller.issuer):
            raise feedback.UnknownCard(f"service {service.id} issued no card {row['card_uuid']}"
                                       + (" to this EHR" if caller else ""), expression=f"feedback[{i}].card")
        # An accepted suggestion must be one this card offered (checked only once the card is the caller's own,
        # so the answer says nothing of other cards); all or nothing as above.
        feedback.check_accepted(row, card.suggestions, f"feedback[{i}]")
        # linked to the patient and assessment the card was about
        row.update(patient_id=card.patient_id, assessment_id=card.assessment_id, hook_instance=card.hook_instance,
                   model_id=card.model_id, model_version=card.model_version, indicator=card.indicator,
                   service_id=service.id, client=caller.issuer if caller else None,
                   tenant=caller.tenant if caller else None)
    store.add_card_events(rows, description=f"CDS service {service.id}: feedback on "
                                            f"{len({row['card_uuid'] for row in rows})} card(s)")
    log.info("CDS %s: %d feedback entr(ies) stored", service.id, len(rows))
    return jsonify({}), 200


@bp.get("/audit/cds-cards")
@requires("AuditEvent", "s", audit="search-type")
def audit():  # type: ignore[no-untyped-def]
    """Cards issued and the feedback on them, oldest first (for auditors; JSON)."""
    args = request.args
    unknown = sorted(set(args) - {"service", "patient", "card", "event", "_count", "_offset"})
    if unknown:
        raise BadRequest(f"unsupported parameter(s) {unknown}", expression=unknown)
    count = whole_number_param("_count", args.get("_count", "100"), 0, MAX_AUDIT_PAGE)
    offset = whole_number_param("_offset", args.get("_offset", "0"), 0, 2 ** 62)
    event = args.get("event")
    if event is not None and event not in ("issued", *feedback.OUTCOMES):
        raise BadRequest("event must be issued, accepted or overridden", expression="event")
    total, rows = _pipeline().store.card_events(service_id=args.get("service"), patient_id=args.get("patient"),
                                                card_uuid=args.get("card"), event=event, count=count,
                                                offset=offset)
    # The audit event names each patient whose cards were read (AuditEvent?patient= finds it).
    note_entities([Entity(f"Patient/{p}") for p in dict.fromkeys(r.patient_id for r in rows if r.patient_id)])
    return jsonify({"total": total, "events": [feedback.as_json(r) for r in rows]})
