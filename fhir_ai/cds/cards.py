"""CDS Hooks cards from stored RiskAssessments: summary, indicator, source, Markdown detail, link."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .. import codes
from ..assessment import UNWEIGHTED, is_not_applicable, not_assessed_reason
from ..mapping import Mapping
from .i18n import TEXT, Translator, t, what

MAX_SUMMARY = 139                     # the spec: "<140-character summary"
OVERRIDE_SYSTEM = f"{codes.BASE}/CodeSystem/cds-override-reason"
OVERRIDE_REASONS = ("lower", "data", "managed", "irrelevant")
INDICATOR = {"negligible": "info", "low": "info", "moderate": "warning", "high": "critical", "certain": "critical"}
_URGENCY = {"info": 0, "warning": 1, "critical": 2}
KTAS_INDICATOR = {"1": "critical", "2": "critical", "3": "warning", "4": "info", "5": "info"}
MISSING_NOTE = "Missing inputs (no usable value in the time window): "
REASONS_PREFIX = "Top contributing inputs: "


@dataclass
class CardSet:
    """Cards for the response and one audit row per card (store.add_card_events)."""
    cards: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def method_code(resource: dict[str, Any]) -> str | None:
    coding = ((resource.get("method") or {}).get("coding") or [{}])[0]
    return coding.get("code")


def _percent(p: float) -> str:
    return "<1%" if p < 0.005 else f"{p * 100:.0f}%"


def _summary(text: str) -> str:
    return text if len(text) <= MAX_SUMMARY else text[:MAX_SUMMARY - 1].rstrip() + "…"


class CardBuilder:
    """Builds the cards of one hook response in one language."""

    def __init__(self, *, model_id: str, model_version: str, mapping: Mapping, language: str, base_url: str,
                 notes: list[tuple[str, dict[str, str]]], issues: list[dict[str, Any]],
                 resources_in: list[dict[str, Any]]) -> None:
        self.model_id, self.version, self.mapping = model_id, model_version, mapping
        self.language, self.base_url = language, base_url
        self.notes, self.issues, self.resources_in = notes, issues, resources_in
        self.tr = Translator(language, mapping)
        key = f"model.{model_id}"
        self.title = t(key, language) if key in TEXT else model_id

    def t(self, key: str, **values: object) -> str:
        return t(key, self.language, **values)

    # -- cards ------------------------------------------------------------------------------------
    def assessment_cards(self, stored: list[dict[str, Any]]) -> CardSet:
        main = [r for r in stored if method_code(r) == self.model_id]
        companions = [r for r in stored if method_code(r) != self.model_id]
        out = CardSet()
        for resource in main:
            self._add(out, self._assessment_card(resource, companions), resource)
        return out

    def not_applicable_card(self, reason_key: str) -> CardSet:
        reason = self.t(reason_key)
        card = self._card(self.t("summary.not_assessed", title=self.title, reason=reason), "info",
                          [self.t("detail.not_assessed", reason=reason), "", self.t("detail.disclaimer")])
        out = CardSet()
        self._add(out, card, None)
        return out

    def _assessment_card(self, resource: dict[str, Any], companions: list[dict[str, Any]]) -> dict[str, Any]:
        companion_short, companion_line, companion_indicator = self._companion(companions)
        lines: list[str] = []
        predictions = resource.get("prediction") or []
        if resource.get("status") == "entered-in-error":
            # Withdrawn by a clinician: no risk from it is shown (its probability and reasons are left out).
            reason = self.t("reason.withdrawn")
            summary = self.t("summary.not_assessed", title=self.title, reason=reason)
            indicator = "warning"
            lines.append(self.t("detail.not_assessed", reason=reason))
            withdrawn = [n.get("text", "") for n in resource.get("note") or []
                         if n.get("text", "").startswith("Entered in error")]
            lines += withdrawn[-1:]
            predictions = []
        elif resource.get("status") == "cancelled" or not predictions:
            said = not_assessed_reason(resource)
            reason = self.t("reason.not_applicable" if is_not_applicable(said) else "reason.insufficient")
            summary = self.t("summary.not_assessed", title=self.title, reason=reason)
            indicator = "warning"   # not "info": an unassessed patient must not look like a low-risk one
            lines.append(self.t("detail.not_assessed", reason=self.tr(said or reason)))
        elif _level_predictions(predictions):
            # The level is the model card's decision rule (probabilityDecimal, weighted toward urgent levels);
            # the card shows the model's own class probabilities, which are what "probability" means.
            levels_found = _level_predictions(predictions)
            best = next((pr for pr in levels_found if _risk_code(pr) == "high"),
                        max(levels_found, key=lambda pr: pr.get("probabilityDecimal") or 0.0))
            level = best["outcome"]["coding"][0]["code"]
            p = _class_probability(best)
            summary = self.t("summary.triage", title=self.title, level=level, name=self.t(f"ktas.{level}"),
                             probability=_percent(p), companion=companion_short)
            indicator = KTAS_INDICATOR.get(level, "warning")
            levels = ", ".join(f"{pr['outcome']['coding'][0]['code']}: {_percent(_class_probability(pr))}"
                               for pr in sorted(levels_found, key=lambda x: x["outcome"]["coding"][0]["code"]))
            lines.append(self.t("detail.level_probability", levels=levels))
            for review in (pr for pr in predictions if pr not in levels_found and pr.get("rationale")):
                lines.append(f"- {self._review_title(review)}: {_percent(review.get('probabilityDecimal') or 0)} "
                             f"({self.tr(review['rationale'])})")
                if _risk_code(review) == "high" and indicator == "info":
                    indicator = "warning"      # a flagged possible under-triage must not look routine
        else:
            prediction = predictions[0]
            p = float(prediction.get("probabilityDecimal") or 0.0)
            risk = _risk_code(prediction) or "moderate"
            outcome = self._outcome(prediction)
            summary = self.t("summary.risk", title=self.title, risk=self.t(f"risk.{risk}"),
                             probability=_percent(p), outcome=outcome, companion=companion_short)
            indicator = INDICATOR.get(risk, "warning")
            lines.append(self.t("detail.probability", outcome=outcome, probability=_percent(p),
                                time_frame=self.t("detail.time_frame")))
        lines.append(self.t("detail.model", title=self.title, model=self.model_id, version=self.version))
        if companion_line:
            lines += ["", companion_line]
        reasons = [pr["rationale"] for pr in predictions if REASONS_PREFIX in (pr.get("rationale") or "")]
        if reasons:
            lines += ["", self.t("detail.reasons")]
            lines += [f"- {self.tr(item)}" for item in _reason_items(reasons[0])]
        missing = _note(resource, MISSING_NOTE)
        lines += ["", self.t("detail.missing", items=self.tr(missing.rstrip("."))) if missing
                  else self.t("detail.missing_none")]
        observations = sum(1 for b in resource.get("basis") or [] if b.get("reference", "").startswith("Observation/"))
        if resource.get("occurrenceDateTime"):
            lines.append(self.t("detail.data", n=observations, as_of=resource["occurrenceDateTime"]))
        notes = [self.t(key, **{**values, "what": what(values.get("what", ""), self.language)})
                 for key, values in self.notes]
        notes += [self.tr(n["text"]) for n in resource.get("note") or []
                  if n.get("text", "").startswith("Values not used")]
        notes += [self._issue(i["diagnostics"]) for i in self.issues if i.get("diagnostics")]
        if notes:
            lines += ["", self.t("detail.notes")] + [f"- {n}" for n in notes]
        lines += ["", self.t("detail.disclaimer")]
        if companion_indicator and _URGENCY[companion_indicator] > _URGENCY[indicator]:
            indicator = companion_indicator   # a high NEWS2 next to a low model risk must not look routine
        card = self._card(summary, indicator, lines)
        card["links"] = [{"label": self.t("link.assessment"), "type": "absolute",
                          "url": f"{self.base_url}/RiskAssessment/{resource['id']}"}]
        return card

    def _card(self, summary: str, indicator: str, lines: list[str]) -> dict[str, Any]:
        return {
            "uuid": str(uuid.uuid4()),
            "summary": _summary(summary),
            "indicator": indicator,
            "detail": "\n".join(lines).strip(),
            "source": {"label": self.t("source.label", title=self.title, model=self.model_id, version=self.version),
                       "topic": {"system": codes.MODEL_SYSTEM, "code": self.model_id,
                                 "display": f"{self.model_id} {self.version}"}},
            "suggestions": [{"label": self.t("suggestion.acknowledge"), "uuid": str(uuid.uuid4())}],
            "selectionBehavior": "at-most-one",
            "overrideReasons": [{"system": OVERRIDE_SYSTEM, "code": code, "display": self.t(f"override.{code}")}
                                for code in OVERRIDE_REASONS],
        }

    def _add(self, out: CardSet, card: dict[str, Any], resource: dict[str, Any] | None) -> None:
        out.cards.append(card)
        # The suggestions' uuids are kept with the card: feedback may accept only these (api.cds_hooks).
        out.events.append({"card_uuid": card["uuid"], "indicator": card["indicator"],
                           "assessment_id": resource["id"] if resource else None,
                           "model_id": self.model_id, "model_version": self.version,
                           "suggestions": json.dumps([s["uuid"] for s in card.get("suggestions") or []])})

    # -- pieces -------------------------------------------------------------------------------------
    def _outcome(self, prediction: dict[str, Any]) -> str:
        outcome = prediction.get("outcome") or {}
        for coding in outcome.get("coding") or []:
            key = f"outcome.{coding.get('code')}"
            if key in TEXT:
                return self.t(key)
        return (outcome.get("text") or self.t("outcome.unknown")).lower()

    def _review_title(self, review: dict[str, Any]) -> str:
        """'Possible under-triage / 과소분류 가능성' as stored, or only the card language's half of it."""
        outcome = review.get("outcome") or {}
        code = ((outcome.get("coding") or [{}])[0]).get("code")
        if self.language != "en" and f"review.{code}" in TEXT:
            return self.t(f"review.{code}")
        return outcome.get("text") or ""

    def _issue(self, diagnostics: str) -> str:
        """A pipeline warning ('deterioration: ...') with the model named by the card's title."""
        if self.language != "en" and diagnostics.startswith(f"{self.model_id}: "):
            diagnostics = f"{self.title}: {diagnostics[len(self.model_id) + 2:]}"
        return self.tr(diagnostics)

    def _companion(self, companions: list[dict[str, Any]]) -> tuple[str, str | None, str | None]:
        """(' (NEWS2 7)', detail line, indicator) from NEWS2, else the nurse's KTAS, else nothing."""
        news2 = next((r for r in companions if method_code(r) == "news2"), None)
        if news2 is not None:
            return self._news2(news2)
        if self.mapping.second_reader:
            level = self._nurse_ktas()
            short = f" (nurse KTAS {level})" if level and self.language == "en" else \
                f" (간호사 KTAS {level})" if level else ""
            text = level or self.t("detail.nurse_ktas_none")
            return short, self.t("detail.nurse_ktas", level=text), None
        return "", None, None

    def _news2(self, resource: dict[str, Any]) -> tuple[str, str, str | None]:
        prediction = (resource.get("prediction") or [{}])[0]
        score = next((e.get("valueInteger") for e in prediction.get("extension") or []
                      if e.get("url") == codes.SCORE_EXTENSION), None)
        band = ((prediction.get("qualitativeRisk") or {}).get("coding") or [{}])[0].get("code")
        if resource.get("status") == "entered-in-error":      # withdrawn: not shown as a score
            return "", self.t("detail.news2", text=self.t("reason.withdrawn")), None
        if resource.get("status") == "cancelled" or score is None:
            return "", self.t("detail.news2", text=self.t("detail.news2_none")), None
        if resource.get("status") == "preliminary":
            rationale = prediction.get("rationale") or ""
            missing = rationale.split("missing: ", 1)[1].split(".", 1)[0] if "missing: " in rationale else "?"
            return (f" (NEWS2 ≥{score})",
                    self.t("detail.news2", text=self.t("detail.news2_partial", score=score, missing=self.tr(missing))),
                    INDICATOR.get(band or "", None))
        # The RCP band as clinicians name it ('low-medium': a single parameter scoring 3), which the risk
        # code (moderate) merges with 'medium'; the rationale states it ("NEWS2 4 (low-medium): …").
        rcp = _NEWS2_BAND.match(prediction.get("rationale") or "")
        named = self.t(f"news2.{rcp.group(1)}") if rcp else self.t(f"risk.{band}") if band else "?"
        return (f" (NEWS2 {score})",
                self.t("detail.news2", text=self.t("detail.news2_score", score=score, band=named)),
                INDICATOR.get(band or "", None))

    def _nurse_ktas(self) -> str | None:
        """The latest nurse KTAS level among the resources the EHR sent (the mapping's second reader)."""
        spec = self.mapping.inputs.get((self.mapping.second_reader or {}).get("input", ""))
        if spec is None:
            return None
        wanted = set(spec.codes)
        latest: tuple[str, str] | None = None
        for obs in self.resources_in:
            if obs.get("resourceType") != "Observation":
                continue
            if not any((c.get("system"), c.get("code")) in wanted for c in (obs.get("code") or {}).get("coding") or []):
                continue
            value = ((obs.get("valueCodeableConcept") or {}).get("coding") or [{}])[0].get("code")
            when = obs.get("effectiveDateTime") or ""
            if value and (latest is None or when >= latest[0]):
                latest = (when, str(value))
        return latest[1] if latest else None


def _risk_code(prediction: dict[str, Any]) -> str | None:
    return ((prediction.get("qualitativeRisk") or {}).get("coding") or [{}])[0].get("code")


_NEWS2_BAND = re.compile(r"NEWS2 \d+ \((low|low-medium|medium|high)\): ")


def _class_probability(prediction: dict[str, Any]) -> float:
    """A KTAS level's class probability (the unweighted extension), else its probabilityDecimal."""
    for extension in prediction.get("extension") or ():
        if extension.get("url") == UNWEIGHTED and isinstance(extension.get("valueDecimal"), (int, float)):
            return float(extension["valueDecimal"])
    return float(prediction.get("probabilityDecimal") or 0.0)


def _level_predictions(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-KTAS-level predictions of a triage assessment (empty for a binary model)."""
    return [p for p in predictions
            if ((p.get("outcome") or {}).get("coding") or [{}])[0].get("system") == codes.KTAS_SYSTEM]


def _note(resource: dict[str, Any], prefix: str) -> str | None:
    for note in resource.get("note") or []:
        text = note.get("text") or ""
        if text.startswith(prefix):
            return text[len(prefix):].strip()
    return None


def _reason_items(rationale: str) -> list[str]:
    if REASONS_PREFIX not in rationale:
        return [rationale]
    items = rationale.split(REASONS_PREFIX, 1)[1].rstrip(".")
    return [item.strip() for item in items.split("; ") if item.strip()]
