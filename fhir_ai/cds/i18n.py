"""Card text in English and Korean, and which of the two a hook request asks for."""
from __future__ import annotations

import functools
import re

from ..mapping import Mapping

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
    "news2.low": {"en": "low", "ko": "낮음"},
    "news2.low-medium": {"en": "low-medium: one parameter scores 3", "ko": "낮음-중간: 한 항목이 3점"},
    "news2.medium": {"en": "medium", "ko": "중간"},
    "news2.high": {"en": "high", "ko": "높음"},
    "summary.risk": {"en": "{title} risk {risk}: {probability} {outcome}{companion}",
                     "ko": "{title} 위험 {risk}: {outcome} 확률 {probability}{companion}"},
    "summary.triage": {"en": "{title}: predicted KTAS {level} ({name}), {probability}{companion}",
                       "ko": "{title}: 예측 KTAS {level}단계({name}), 확률 {probability}{companion}"},
    "summary.not_assessed": {"en": "{title}: not assessed ({reason})", "ko": "{title}: 평가하지 못함 ({reason})"},
    "reason.insufficient": {"en": "insufficient data", "ko": "자료 부족"},
    "reason.not_applicable": {"en": "not applicable to this encounter", "ko": "이 내원에는 해당 없음"},
    "reason.not_ed": {"en": "not an emergency department encounter", "ko": "응급실 내원이 아님"},
    "reason.withdrawn": {"en": "the assessment of these data was withdrawn as entered in error",
                         "ko": "이 데이터에 대한 평가는 입력 오류로 철회됨"},
    "outcome.419099009": {"en": "in-hospital death", "ko": "원내 사망"},
    "ktas.1": {"en": "Resuscitation", "ko": "소생"},
    "ktas.2": {"en": "Emergent", "ko": "긴급"},
    "ktas.3": {"en": "Urgent", "ko": "응급"},
    "ktas.4": {"en": "Less urgent", "ko": "준응급"},
    "ktas.5": {"en": "Non-urgent", "ko": "비응급"},
    "detail.probability": {"en": "**Probability** of {outcome}: **{probability}** (calibrated; {time_frame})",
                           "ko": "**{outcome} 확률**: **{probability}** (보정됨; {time_frame})"},
    "detail.level_probability": {"en": "**Probability** of each KTAS level (the model's; the predicted level is "
                                       "chosen with urgent levels weighted up): {levels}",
                                 "ko": "**KTAS 단계별 확률** (모델 산출; 예측 단계는 긴급 단계에 가중치를 두어 선택): {levels}"},
    "detail.model": {"en": "Model: {model} {version}", "ko": "모델: {title} ({model} {version})"},
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
    "link.assessment": {"en": "Stored assessment (FHIR RiskAssessment)", "ko": "저장된 평가 결과 (FHIR)"},
    "source.label": {"en": "fhir_ai {model} model {version}", "ko": "fhir_ai {title} 모델 {version}"},
    "outcome.unknown": {"en": "the outcome", "ko": "결과"},
    "review.under-triage": {"en": "Possible under-triage", "ko": "과소분류 가능성"},
    "review.over-triage": {"en": "Possible over-triage", "ko": "과대분류 가능성"},
    "what.Patient": {"en": "Patient", "ko": "환자 정보"},
    "what.Encounter": {"en": "Encounter", "ko": "내원 정보"},
    "what.Observation": {"en": "Observation", "ko": "관찰값"},
    "suggestion.acknowledge": {"en": "Acknowledge", "ko": "확인함"},
    "override.lower": {"en": "Clinical assessment: risk lower than shown", "ko": "임상 판단상 위험이 더 낮음"},
    "override.data": {"en": "Input data incomplete or wrong", "ko": "입력 자료가 불완전하거나 틀림"},
    "override.managed": {"en": "Already being managed", "ko": "이미 조치 중"},
    "override.irrelevant": {"en": "Not relevant for this patient", "ko": "이 환자에게 해당 없음"},
    "note.prefetch_null": {"en": "The EHR reported no {what}.", "ko": "EHR에 {what} 자료가 없습니다."},
    "note.fetched": {"en": "{what} fetched from the EHR's FHIR server (not prefetched).",
                     "ko": "{what}: 사전 전달 없이 EHR의 FHIR 서버에서 조회함."},
    "note.prefetch_error": {"en": "The EHR could not prefetch {what} ({error}); fetched it from its FHIR server.",
                            "ko": "EHR이 {what}을(를) 사전 전달하지 못해({error}) FHIR 서버에서 조회함."},
}

# Reason.text() wording (fhir_ai.models.explain) and the aggregate words of feature labels
# (fhir_ai.mapping.loader.AGGREGATE_WORDS), for Korean cards built from a stored rationale; then the NEWS2
# parameter names of a partial score's "missing:" list (fhir_ai.assessment.NEWS2_PARAMETERS_TEXT).
_KO_PHRASES = [("raised the risk", "위험을 높임"), ("lowered the risk", "위험을 낮춤"),
               ("not measured", "측정 안 됨"), ("(latest)", "(최근값)"), ("(first)", "(첫 값)"),
               ("(lowest)", "(최저)"), ("(highest)", "(최고)"), ("(mean)", "(평균)"), ("(median)", "(중앙값)"),
               ("(variability)", "(변동성)"), ("(number of measurements)", "(측정 횟수)"), ("(total)", "(합계)"),
               ("(trend per hour)", "(시간당 추세)"), ("(change)", "(변화)"), ("(any)", "(여부)"),
               ("respiration rate", "호흡수"), ("SpO2", "산소포화도"), ("air or oxygen", "산소 투여 여부"),
               ("systolic blood pressure", "수축기 혈압"), ("pulse", "맥박"), ("consciousness", "의식 수준"),
               ("temperature", "체온")]

# The sentences fhir_ai itself writes in English into stored notes, rationales and OperationOutcome issues
# (fhir_ai.assessment, models.scoring.insufficient_reason, features.extract.Dropped and its reasons,
# pipeline warnings), as they reach a card. Text quoted from elsewhere (an upstream server's error) stays.
# Encounter.class codes (v3 ActCode) as a Korean reader knows them; another code is shown as it is.
_KO_CLASSES = {"EMER": "응급실", "IMP": "입원", "ACUTE": "급성기 입원", "NONAC": "비급성기 입원", "AMB": "외래",
               "OBSENC": "관찰", "PRENC": "사전 입원", "SS": "단기 입원", "HH": "가정 방문", "VR": "원격",
               "FLD": "현장", "none given": "유형 없음"}


def _classes(codes: str) -> str:
    return ", ".join(_KO_CLASSES.get(code.strip(), code.strip()) for code in codes.split(","))


_KO_SENTENCES = [(re.compile(pattern), korean) for pattern, korean in [
    (r"Found (\d+) of the core inputs \((.*?)\) in the time window; at least (\d+) are needed\.",
     r"시간 범위 안에서 핵심 입력값(\2) 중 \1개 확인됨; 최소 \3개가 필요함."),
    (r"not assessed, insufficient data\.", "평가하지 못함, 자료 부족."),
    (r"not applicable\. The (\w+) model is for encounters of class ([^;]+); ",
     lambda m: f"해당 없음. 이 모델은 {_classes(m.group(2))} 내원에만 적용됨; "),
    (r"not assessed, 해당 없음\.", "평가하지 못함, 해당 없음."),
    (r"the current encounter \((Encounter/[^)]+)\) is of class ([^.]+)\.",
     lambda m: f"현재 내원({m.group(1)})은 {_classes(m.group(2))} 내원임."),
    (r"the patient has no current encounter with a start time\.", "시작 시각이 있는 현재 내원이 없음."),
    (r"insufficient data\.", "자료 부족."),
    (r"(\d+) value\(s\) not used \(see RiskAssessment\.note\)", r"값 \1개를 사용하지 않음 (저장된 평가의 참고 사항 참조)"),
    (r"^Values not used: ", "사용하지 않은 값: "),
    (r" \(and (\d+) more\)", r" (외 \1건)"),
    (r": unreadable effective time", ": 측정 시각을 읽을 수 없음"),
    (r": no effective time", ": 측정 시각 없음"),
    (r": unit (.*?) cannot be converted to (.*?)(?=; |\.$|$)", r": 단위 \1을(를) \2(으)로 변환할 수 없음"),
    (r": unit cannot be converted", ": 단위를 변환할 수 없음"),
    (r": coded value not in the mapping's values", ": 매핑에 없는 코드값"),
    (r": (value[A-Za-z]+) given where (value[A-Za-z]+) is read", r": \2 대신 \1 값이 있음"),
    (r": implausible value (\S+)( [^(;]*[^ (;])? ?\(plausible ([^)]*)\)", r": 비정상 범위의 값 \1\2 (허용 범위 \3)"),
    (r": implausible value", ": 비정상 범위의 값"),
    (r"Nurse assigned KTAS (\w+); probability that the right level is more urgent: ([\d.]+)",
     r"간호사 분류 KTAS \1; 실제 단계가 더 긴급할 확률 \2"),
    (r"Nurse assigned KTAS (\w+); probability that the right level is less urgent: ([\d.]+)",
     r"간호사 분류 KTAS \1; 실제 단계가 덜 긴급할 확률 \2"),
    (r" \(at or above ([\d.]+): please re-check this patient\)", r" (기준 \1 이상: 환자를 다시 평가하십시오)"),
    (r"RiskAssessment/(\S+) for these same data was withdrawn as entered in error; it is returned as it stands "
     r"and is no current risk \(new data make a new assessment\)",
     r"같은 데이터에 대한 RiskAssessment/\1은(는) 입력 오류로 철회됨; 그대로 반환하며 현재 위험도가 아님 "
     r"(새 데이터가 있으면 새로 평가함)"),
    (r"^write-back skipped: the configured source is a read-only folder$",
     "병원 서버에 기록하지 않음: 설정된 자료 출처가 읽기 전용 폴더임"),
]]
# Sentences that quote another server's own error text: translated as a whole and nothing else, so that
# no label or phrase replacement touches the quoted part.
_KO_QUOTING = [(re.compile(pattern), korean) for pattern, korean in [
    (r"^write-back of (\S+) to the hospital server failed \((.*)\); it is stored here and queued for retry$",
     r"\1을(를) 병원 서버에 기록하지 못함 (\2); 이 서버에 저장되었고 재시도 대기 중"),
    (r"^write-back of (\S+) failed: (.*)$", r"\1을(를) 병원 서버에 기록하지 못함: \2"),
]]
_INPUT_NAME = re.compile(r"\(([a-z][a-z0-9_]*)\): ")   # Dropped.as_text(): "Observation/x (heart_rate): why"


def t(key: str, language: str, **values: object) -> str:
    entry = TEXT[key]
    return entry.get(language, entry["en"]).format(**values)


class Translator:
    """Text fhir_ai stored in English (a mapping's labels and input names, its own fixed sentences and
    phrases) into a card's language; English text is returned as it is."""

    def __init__(self, language: str, mapping: Mapping) -> None:
        self.language = language
        self.labels: dict[str, str] = {}
        self.names: dict[str, str] = {}
        for spec in mapping.inputs.values():
            if spec.label_ko:
                self.labels[spec.label] = spec.label_ko
            self.names[spec.name] = spec.label_ko or spec.label
            for category in spec.categories.values():
                if category.get("label") and category.get("label_ko"):
                    self.labels[category["label"]] = category["label_ko"]

    def __call__(self, text: str) -> str:
        if self.language != "ko":
            return text
        for pattern, korean in _KO_QUOTING:
            quoting = pattern.match(text)
            if quoting:
                return quoting.expand(korean)
        for pattern, korean in _KO_SENTENCES:
            text = pattern.sub(korean, text)
        text = _INPUT_NAME.sub(lambda m: f"({self.names.get(m.group(1), m.group(1))}): ", text)
        return self._words.sub(lambda m: self._korean[m.group(0)], text)

    @functools.cached_property
    def _korean(self) -> dict[str, str]:
        return {**self.labels, **dict(_KO_PHRASES)}

    @functools.cached_property
    def _words(self) -> re.Pattern[str]:
        """Every label and phrase as a whole word (not inside another: 'pulse' in 'impulse'), longest first."""
        alternatives = "|".join(re.escape(english) for english in sorted(self._korean, key=len, reverse=True))
        return re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])")


def what(name: str, language: str) -> str:
    """A prefetch note's subject (cds.prefetch._what: Patient, Encounter, 'Observations (key)')."""
    if language != "ko":
        return name
    if f"what.{name}" in TEXT:
        return t(f"what.{name}", language)
    chunk = re.fullmatch(r"Observations \(observations(?:-(\d+))?\)", name)
    if chunk:
        return t("what.Observation", language) + (f" ({chunk.group(1)}번째 묶음)" if chunk.group(1) else "")
    return name


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
