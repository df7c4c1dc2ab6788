"""Korean CDS cards: every clinician-facing string of a card is Korean, whatever the card has to say
(explanations, missing inputs, values not used, a partial NEWS2, prefetch notes, warnings, triage review)."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from fhir_ai.cds.i18n import Translator, what
from fhir_ai.mapping import Mapping
from fhir_ai.models.explain import unit_display

import factories as f
from test_cds_hooks import (FHIR, call, ed_record, ehr_server_allowed, full_prefetch, hook_request,  # noqa: F401
                            searchset, the_card)

KO = {"extension": {"fhir-ai.language": "ko"}}
# What may stay in Latin letters: abbreviations clinicians use as they are, references, URLs, units and
# values quoted from the data ('...').
ACRONYMS = {"KTAS", "NEWS2", "AVPU", "NRS", "EHR", "FHIR", "ALT", "AST", "GCS"}
REFERENCE = re.compile(r"https?://\S+|\b[A-Z][A-Za-z]+/[A-Za-z0-9\-.]+|'[^']*'")
WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")


@pytest.fixture
def settings_overrides(settings_overrides: dict[str, Any]) -> dict[str, Any]:
    settings_overrides["cds_require_jwt"] = False
    settings_overrides["write_back"] = True     # the demo folder is read-only: a write-back warning reaches the card
    return settings_overrides


def english_words(text: str, mapping: Mapping, model_id: str, version: str) -> list[str]:
    """Latin words left in a Korean card's text once the allowed tokens are taken out."""
    text = REFERENCE.sub(" ", text).replace(f"{model_id} {version}", " ").replace(version, " ")
    text = text.replace("fhir_ai", " ")
    units = {s.unit for s in mapping.inputs.values() if s.unit}
    for unit in sorted(units | {unit_display(u) for u in units} - {""}, key=len, reverse=True):
        text = re.sub(rf"(?<=[\d ]){re.escape(unit)}(?=[\s,;.)]|$)", " ", text)
    return [w for w in WORD.findall(text) if re.search("[A-Za-z]{3}", w) and w not in ACRONYMS]


def check_korean(app: Flask, card: dict[str, Any], model_id: str) -> None:
    model, mapping = app.extensions["fhir_ai"].registry.get(model_id)
    texts = [card["summary"], card["detail"], card["source"]["label"]]
    texts += [s["label"] for s in card.get("suggestions") or []]
    texts += [link["label"] for link in card.get("links") or []]
    texts += [r["display"] for r in card.get("overrideReasons") or []]
    for text in texts:
        assert english_words(text, mapping, model_id, model.version) == [], text


def korean(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, **KO}


def partial_record() -> dict[str, Any]:
    """Three vital signs only (NEWS2 partial, most inputs missing) and three values that cannot be used."""
    now = datetime.now(timezone.utc) - timedelta(minutes=5)
    patient = f.patient()
    encounter = f.encounter(patient["id"])
    pid, ref = patient["id"], {"reference": f"Encounter/{encounter['id']}"}
    observations = [f.observation(pid, code, value, unit, now - timedelta(hours=h), encounter=ref)
                    for code, value, unit, h in (("8867-4", 118, "/min", 2), ("8867-4", 126, "/min", 0),
                                                 ("9279-1", 26, "/min", 1), ("8310-5", 38.6, "Cel", 1))]
    observations += [
        f.observation(pid, "8867-4", 900, "/min", now, encounter=ref),                  # implausible
        f.observation(pid, "8310-5", 101, "[degF]x", now, encounter=ref),               # unit not convertible
        f.observation(pid, "9279-1", 22, "/min", now, encounter=ref),                   # no time (below)
    ]
    del observations[-1]["effectiveDateTime"]
    return {"patient": patient, "encounter": encounter, "observations": observations}


def test_deterioration_card_with_partial_data_is_all_korean(app: Flask, client: FlaskClient) -> None:
    record = partial_record()
    prefetch = full_prefetch(record)
    del prefetch["observations"]                 # fetched from the EHR's server: a note says so
    with responses.RequestsMock() as rsps:
        rsps.post(f"{FHIR}/Observation/_search", json=searchset(record["observations"]))
        card = the_card(call(client, korean(hook_request(record, prefetch=prefetch))))
        english = the_card(call(client, hook_request(record, prefetch=prefetch)))
    detail = card["detail"]
    # The card has everything to say: explanations, missing inputs, a partial NEWS2, values not used,
    # the fetch note and the write-back warning; all of it in Korean.
    assert "**주요 기여 입력값**" in detail and "심박수" in detail and "위험을 높임" in detail
    assert "**누락된 입력값**: " in detail and "산소포화도" in detail
    assert "부분 점수" in detail and "누락: " in detail
    assert "사용하지 않은 값: " in detail and "비정상 범위의 값 900 /min (허용 범위" in detail
    assert "측정 시각 없음" in detail and "변환할 수 없음" in detail
    assert "관찰값: 사전 전달 없이 EHR의 FHIR 서버에서 조회함." in detail
    assert detail.count("병원 서버에 기록하지 않음") == 1
    assert card["source"]["label"].startswith("fhir_ai 악화 모델 ")
    check_korean(app, card, "deterioration")
    # English cards are as before.
    assert "Values not used: " in english["detail"] and "implausible value 900 /min" in english["detail"]
    assert "partial " in english["detail"] and english["detail"].count("write-back skipped") == 1   # once, not per resource
    assert english["source"]["label"].startswith("fhir_ai deterioration model ")


def test_not_assessed_deterioration_card_is_all_korean(app: Flask, client: FlaskClient) -> None:
    record = partial_record()
    prefetch = full_prefetch(record)
    prefetch["observations"] = None
    card = the_card(call(client, korean(hook_request(record, prefetch=prefetch, server=False))))
    assert "평가하지 못함" in card["summary"] and "핵심 입력값(심박수, 호흡수" in card["detail"]
    assert "EHR에 관찰값 자료가 없습니다." in card["detail"]
    check_korean(app, card, "deterioration")


def test_triage_cards_are_all_korean(app: Flask, client: FlaskClient) -> None:
    if "triage" not in app.extensions["fhir_ai"].registry.models:
        pytest.skip("no trained triage model in this tree")
    record = ed_record()
    body = hook_request(record, prefetch=full_prefetch(record), server=False, hook="encounter-start")
    card = the_card(call(client, korean(body), "triage"))
    detail = card["detail"]
    assert "**KTAS 단계별 확률**" in detail and "간호사 분류 KTAS 3" in detail
    assert "흉통: " in detail and "**누락된 입력값**: " in detail      # the chief complaint's category, in Korean
    check_korean(app, card, "triage")
    outside = ed_record(ed=False)
    card = the_card(call(client, korean(hook_request(outside, prefetch=full_prefetch(outside), server=False)),
                         "triage-ed-view"))
    assert "응급실 내원이 아님" in card["summary"]
    check_korean(app, card, "triage")


def test_a_triage_that_does_not_apply_says_so_in_korean(app: Flask, client: FlaskClient) -> None:
    if "triage" not in app.extensions["fhir_ai"].registry.models:
        pytest.skip("no trained triage model in this tree")
    record = ed_record()
    del record["encounter"]["period"]        # an ED visit that cannot be placed in time: no current encounter
    body = hook_request(record, prefetch=full_prefetch(record), server=False, hook="encounter-start")
    card = the_card(call(client, korean(body), "triage"))
    assert "이 내원에는 해당 없음" in card["summary"] and "자료 부족" not in card["summary"]
    assert "시작 시각이 있는 현재 내원이 없음" in card["detail"]
    check_korean(app, card, "triage")
    english = the_card(call(client, hook_request(record, prefetch=full_prefetch(record), server=False,
                                                 hook="encounter-start"), "triage"))
    assert "not applicable to this encounter" in english["summary"]


def test_the_checker_finds_english(app: Flask) -> None:
    model, mapping = app.extensions["fhir_ai"].registry.get("deterioration")
    assert english_words(f"심박수 (최근값): 128 /min — raised the risk (deterioration {model.version})",
                         mapping, "deterioration", model.version) == ["raised", "the", "risk"]
    assert english_words("Observation/obs-1 (심박수): 38 Cel, NEWS2 KTAS https://x.org/a", mapping,
                         "deterioration", model.version) == []


def test_stored_sentences_in_korean(app: Flask) -> None:
    """Sentences a card can quote that the end-to-end cards above may not meet."""
    _, mapping = app.extensions["fhir_ai"].registry.get("deterioration")
    tr = Translator("ko", mapping)
    assert tr("write-back of RiskAssessment/fai-1 failed: token rejected") == \
        "RiskAssessment/fai-1을(를) 병원 서버에 기록하지 못함: token rejected"   # the upstream's own words stay
    assert tr("Values not used: Observation/o1 (spo2): coded value not in the mapping's values (and 3 more).") == \
        "사용하지 않은 값: Observation/o1 (산소포화도): 매핑에 없는 코드값 (외 3건)."
    assert tr("Values not used: Observation/o2 (gcs): implausible value 40 (plausible 3-15).") == \
        "사용하지 않은 값: Observation/o2 (글래스고 혼수 척도): 비정상 범위의 값 40 (허용 범위 3-15)."
    assert tr("Values not used: Observation/o3 (gcs): valueBoolean given where valueInteger is read.") == \
        "사용하지 않은 값: Observation/o3 (글래스고 혼수 척도): valueInteger 대신 valueBoolean 값이 있음."
    assert what("Observations (observations-2)", "ko") == "관찰값 (2번째 묶음)"
    assert what("Observations (observations-2)", "en") == "Observations (observations-2)"
    assert Translator("en", mapping)("Values not used: x") == "Values not used: x"
    # Quoted upstream text keeps its own words, even those that are our phrases or labels ...
    quoted = "write-back of RiskAssessment/fai-1 to the hospital server failed (HTTP 500: pulse temperature " \
             "SpO2 rejected); it is stored here and queued for retry"
    assert tr(quoted) == "RiskAssessment/fai-1을(를) 병원 서버에 기록하지 못함 (HTTP 500: pulse temperature SpO2 " \
                         "rejected); 이 서버에 저장되었고 재시도 대기 중"
    # ... and a phrase is replaced only as a whole word.
    assert tr("missing: pulse, temperature") == "missing: 맥박, 체온"
    # A model that is not for this visit (mapping scoring.encounter_classes): the note and the warning.
    assert tr("not applicable. The triage model is for encounters of class EMER; the current encounter "
              "(Encounter/e1) is of class IMP.") == \
        "해당 없음. 이 모델은 응급실 내원에만 적용됨; 현재 내원(Encounter/e1)은 입원 내원임."
    assert tr("triage: not assessed, not applicable. The triage model is for encounters of class EMER; the "
              "patient has no current encounter with a start time.") == \
        "triage: 평가하지 못함, 해당 없음. 이 모델은 응급실 내원에만 적용됨; 시작 시각이 있는 현재 내원이 없음."
    assert tr("impulse; temperatures") == "impulse; temperatures"


@pytest.mark.parametrize("language, shown", [("en", "**NEWS2** (next to the model): 4 (low-medium: one parameter scores 3)"),
                                             ("ko", "**NEWS2** (모델과 비교): 4점 (낮음-중간: 한 항목이 3점)")])
def test_news2_is_named_by_its_rcp_band(app: Flask, language: str, shown: str) -> None:
    """A NEWS2 of 4 with one parameter scoring 3 is 'low-medium' (RCP 2017: an urgent ward-based response), which
    the risk code 'moderate' merges with 'medium': the card names the band as clinicians do."""
    from fhir_ai import codes
    from fhir_ai.cds.cards import CardBuilder
    _, mapping = app.extensions["fhir_ai"].registry.get("deterioration")
    builder = CardBuilder(model_id="deterioration", model_version="x", mapping=mapping, language=language,
                          base_url="http://localhost", notes=[], issues=[], resources_in=[])
    news2 = {"status": "final", "prediction": [{
        "rationale": "NEWS2 4 (low-medium): consciousness 3 points; pulse 1 point. Clinical response: urgent",
        "qualitativeRisk": {"coding": [{"code": "moderate"}]},
        "extension": [{"url": codes.SCORE_EXTENSION, "valueInteger": 4}]}]}
    short, line, indicator = builder._news2(news2)
    assert short == " (NEWS2 4)" and line == shown and indicator == "warning"
