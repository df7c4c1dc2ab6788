"""Card text in English and Korean, and which of the two a hook request asks for."""
from __future__ import annotations

import re

LANGUAGES = ("en", "ko")
# A CDS Hooks request extension a client may send instead of Accept-Language (namespaced per the spec).
LANGUAGE_EXTENSION = "fhir-ai.language"

TEXT: dict[str, dict[str, str]] = {
    "model.deterioration": {"en": "Deterioration", "ko": "악화"},
    "model.triage": {"en": "Triage (KTAS)", "ko": "중증도 분류(KTAS)"},
    "risk.negligible": {"en": "negligible", "ko": "매우 낮음"},
    "risk.low": {"en": "low", "ko": "낮음"},
    "risk.moderate": {"en": "moderate", "ko": "중간"},
    "risk.high": {"en": "high", "ko": "높음"},
    "risk.certain": {"en": "certain", "ko": "확실"},
    "summary.risk": {"en": "{title} risk {risk}: {probability} {outcome}{companion}",
                     "ko": "{title} 위험 {risk}: {outcome} 확률 {probability}{companion}"},
    "summary.triage": {"en": "{title}: predicted KTAS {level} ({name}), {probability}{companion}",
                       "ko": "{title}: 예측 KTAS {level}단계({name}), 확률 {probability}{companion}"},
    "summary.not_assessed": {"en": "{title}: not assessed ({reason})", "ko": "{title}: 평가하지 못함 ({reason})"},
    "reason.insufficient": {"en": "insufficient data", "ko": "자료 부족"},
    "reason.not_ed": {"en": "not an emergency department encounter", "ko": "응급실 내원이 아님"},
    "outcome.419099009": {"en": "in-hospital death", "ko": "원내 사망"},
    "ktas.1": {"en": "Resuscitation", "ko": "소생"},
    "ktas.2": {"en": "Emergent", "ko": "긴급"},
    "ktas.3": {"en": "Urgent", "ko": "응급"},
    "ktas.4": {"en": "Less urgent", "ko": "준응급"},
    "ktas.5": {"en": "Non-urgent", "ko": "비응급"},
    "detail.probability": {"en": "**Probability** of {outcome}: **{probability}** (calibrated; {time_frame})",
                           "ko": "**{outcome} 확률**: **{probability}** (보정됨; {time_frame})"},
    "detail.level_probability": {"en": "**Probability** of each KTAS level: {levels}",
                                 "ko": "**KTAS 단계별 확률**: {levels}"},
    "detail.model": {"en": "Model: {model} {version}", "ko": "모델: {model} {version}"},
    "detail.news2": {"en": "**NEWS2** (next to the model): {text}", "ko": "**NEWS2** (모델과 비교): {text}"},
    "detail.news2_score": {"en": "{score} ({band})", "ko": "{score}점 ({band})"},
    "detail.news2_partial": {"en": "partial {score} from the parameters recorded; missing: {missing}",
                             "ko": "기록된 항목만으로 부분 점수 {score}점; 누락: {missing}"},
    "detail.news2_none": {"en": "not scored (none of its parameters recorded)", "ko": "산출 불가 (항목 기록 없음)"},
    "detail.nurse_ktas": {"en": "**Nurse KTAS** (next to the model): {level}", "ko": "**간호사 KTAS** (모델과 비교): {level}"},
    "detail.nurse_ktas_none": {"en": "not recorded", "ko": "기록 없음"},
    "detail.reasons": {"en": "**Top contributing inputs**", "ko": "**주요 기여 입력값**"},
    "detail.missing": {"en": "**Missing inputs**: {items}", "ko": "**누락된 입력값**: {items}"},
    "detail.missing_none": {"en": "**Missing inputs**: none", "ko": "**누락된 입력값**: 없음"},
    "detail.not_assessed": {"en": "**Not assessed**: {reason}", "ko": "**평가하지 못함**: {reason}"},
    "detail.data": {"en": "Based on {n} observation(s), as of {as_of}.", "ko": "관찰값 {n}건 기준, 기준 시각 {as_of}."},
    "detail.notes": {"en": "**Notes**", "ko": "**참고**"},
    "detail.disclaimer": {"en": "_Decision support only: it augments clinical judgement and never replaces it._",
                          "ko": "_의사결정 보조 정보이며 임상적 판단을 대신하지 않습니다._"},
    "detail.time_frame": {"en": "until hospital discharge", "ko": "퇴원 시까지"},
    "link.assessment": {"en": "Stored assessment (FHIR RiskAssessment)", "ko": "저장된 평가 (FHIR RiskAssessment)"},
    "suggestion.acknowledge": {"en": "Acknowledge", "ko": "확인함"},
    "override.lower": {"en": "Clinical assessment: risk lower than shown", "ko": "임상 판단상 위험이 더 낮음"},
    "override.data": {"en": "Input data incomplete or wrong", "ko": "입력 자료가 불완전하거나 틀림"},
    "override.managed": {"en": "Already being managed", "ko": "이미 조치 중"},
    "override.irrelevant": {"en": "Not relevant for this patient", "ko": "이 환자에게 해당 없음"},
    "note.prefetch_null": {"en": "The EHR reported no {what}.", "ko": "EHR에 {what} 자료가 없습니다."},
    "note.fetched": {"en": "{what} fetched from the EHR's FHIR server (not prefetched).",
                     "ko": "{what}: 사전 전달(prefetch) 없이 EHR FHIR 서버에서 조회함."},
    "note.prefetch_error": {"en": "The EHR could not prefetch {what} ({error}); fetched it from its FHIR server.",
                            "ko": "EHR이 {what}을(를) 사전 전달하지 못해({error}) FHIR 서버에서 조회함."},
}

# Reason.text() wording (fhir_ai.models.explain) and the aggregate words of feature labels
# (fhir_ai.mapping.loader.AGGREGATE_WORDS), for Korean cards built from a stored rationale.
_KO_PHRASES = [("raised the risk", "위험을 높임"), ("lowered the risk", "위험을 낮춤"),
               ("not measured", "측정 안 됨"), ("(latest)", "(최근값)"), ("(first)", "(첫 값)"),
               ("(lowest)", "(최저)"), ("(highest)", "(최고)"), ("(mean)", "(평균)"), ("(median)", "(중앙값)"),
               ("(variability)", "(변동성)"), ("(number of measurements)", "(측정 횟수)"), ("(total)", "(합계)"),
               ("(trend per hour)", "(시간당 추세)"), ("(change)", "(변화)"), ("(any)", "(여부)")]


def t(key: str, language: str, **values: object) -> str:
    entry = TEXT[key]
    return entry.get(language, entry["en"]).format(**values)


def translate_labels(text: str, language: str, labels: dict[str, str]) -> str:
    """English input labels (mapping ``label`` → ``label_ko``) and fixed phrases into Korean."""
    if language != "ko":
        return text
    for english in sorted(labels, key=len, reverse=True):
        text = text.replace(english, labels[english])
    for english, korean in _KO_PHRASES:
        text = text.replace(english, korean)
    return text


_RANGE = re.compile(r"^\s*([A-Za-z]{1,8})(?:-[A-Za-z0-9]{1,8})*\s*(?:;\s*q\s*=\s*([0-9.]+))?\s*$")


def negotiate(accept_language: str | None, requested: object, default: str) -> str:
    """The card language: a request extension, else Accept-Language (by q), else the site default, else en."""
    if isinstance(requested, str) and requested.split("-")[0].lower() in LANGUAGES:
        return requested.split("-")[0].lower()
    choices: list[tuple[float, int, str]] = []
    for i, part in enumerate((accept_language or "").split(",")):
        match = _RANGE.match(part)
        if not match:
            continue
        try:
            q = float(match.group(2)) if match.group(2) else 1.0
        except ValueError:
            continue
        tag = match.group(1).lower()
        if q > 0 and tag in LANGUAGES:
            choices.append((-q, i, tag))
    if choices:
        return min(choices)[2]
    default = (default or "en").split("-")[0].lower()
    return default if default in LANGUAGES else "en"
