"""Model cards as Markdown, rendered from the JSON card written at training time."""
from __future__ import annotations

from typing import Any


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def deterioration_markdown(card: dict[str, Any]) -> str:
    m = card["metrics"]
    ours, saps, news = m["model"], m["saps_i"], m["news2"]
    t = card["training"]
    lines = [
        f"# Model card: {card['model']} {card['version']}", "", card["title"], "",
        "## Intended use", card["intended_use"], "",
        "## Training data",
        f"{t['data']}: {t['stays']} stays, {t['deaths']} deaths. Each stay goes through the same FHIR path as "
        "serving (raw record → FHIR resources per fhir-mapping.csv → mapping → features).",
        f"Data sha256: " + ", ".join(f"`{k}` {v[:16]}…" for k, v in t["data_sha256"].items()), "",
        f"Reproduce: `{t['command']}` (seed {t['seed']}, {t['folds']}-fold CV, {t['rounds']} rounds, "
        f"LightGBM {t['environment']['lightgbm']}).", "",
        "## Cross-validated performance (out-of-fold, same stays)", "",
        "| | AUROC | event-1 (min Se, PPV) | Hosmer–Lemeshow H | stays |", "|---|---|---|---|---|",
        f"| this model | {_f(ours['auroc'])} | {_f(ours['event1'])} | {_f(ours['hosmer_lemeshow_h'], 2)} | {ours['n']} |",
        f"| this model, stays with SAPS-I | {_f(m['model_on_saps_stays']['auroc'])} | | | {m['model_on_saps_stays']['n']} |",
        f"| SAPS-I | {_f(saps['auroc'])} | {_f(saps['event1'])} | {_f(saps['hosmer_lemeshow_h'], 2)} | {saps['n']} |",
        f"| NEWS2 (last values, 24 h) | {_f(news['auroc'])} | {_f(news['event1'])} | {_f(news['hosmer_lemeshow_h'], 2)} | {news['n']} |",
        "",
        "event-1 and H follow the PhysioNet/CinC 2012 scoring code; decision thresholds and calibration are "
        "fitted on the other folds only (cross-fitted). Baselines are turned into probabilities the same way "
        "(Platt scaling). Challenge reference on the hidden set-c: best entries event-1 0.5353 and H 17.88; "
        "SAPS-I 0.3125 and 68.58.", "",
        f"NEWS2 was complete (all 7 parameters) for {news.get('complete_stays', 'n/a')} stays; missing parameters "
        "score 0 in this comparison.", "",
        "## Risk categories (qualitativeRisk)", card["thresholds"]["rule"], "",
        f"- high: probability ≥ {card['thresholds']['high']:.3f}",
        f"- moderate: probability ≥ {card['thresholds']['moderate']:.3f}",
        "- low: below", "",
        "## Calibration (out-of-fold, cross-fitted isotonic)", "",
        "| mean predicted | observed | n |", "|---|---|---|",
    ]
    for row in m["calibration_table"]:
        lines.append(f"| {_f(row.get('mean_predicted'))} | {_f(row.get('observed_rate'))} | {row.get('n')} |")
    ends = (card.get("calibration") or {}).get("ends") or {}
    for side, words in (("low", "lowest scores, none with the outcome"), ("high", "highest scores, all with the outcome")):
        if side in ends:
            end = ends[side]
            how = ("the next block's value: Laplace's rule, (k + 1) / (n + 2), would have crossed it"
                   if end.get("held_at_next_block") else "Laplace's rule, (k + 1) / (n + 2)")
            lines += ["", f"The {end['cases']} training stays with the {words}, would be calibrated to "
                      f"{0 if side == 'low' else 1}: a certainty the sample cannot support. They get "
                      f"{end['probability']:.4f} instead ({how})."]
    lines += ["", "## Features", f"{len(card['features'])} features from `{card['mapping']['file']}` "
              f"(mapping version {card['mapping']['version']}). Most important by gain: "
              + ", ".join(card["top_features_by_gain"]) + ".", "", "## Limitations"]
    lines += [f"- {item}" for item in card["limitations"]]
    return "\n".join(lines) + "\n"


def triage_markdown(card: dict[str, Any]) -> str:
    m = card["metrics"]
    t = card["training"]
    sr = card["second_reader"]

    def row(name: str, s: dict[str, float]) -> str:
        return (f"| {name} | {_f(s['exact_accuracy'])} | {_f(s['kappa_linear'])} | {_f(s['kappa_quadratic'])} | "
                f"{_f(s['under_triage'])} | {_f(s['over_triage'])} |")

    lines = [
        f"# Model card: {card['model']} {card['version']}", "", card["title"], "",
        "## Intended use", card["intended_use"], "",
        "## Training data",
        f"{t['data']}: {t['visits']} visits through the same FHIR path as serving. The nurse's KTAS level is "
        "never a model input.",
        "Data sha256: " + ", ".join(f"`{k}` {v[:16]}…" for k, v in t["data_sha256"].items()), "",
        f"Reproduce: `{t['command']}` (seed {t['seed']}, {t['folds']}-fold CV, {t['rounds']} rounds).", "",
        "## Cross-validated performance against the expert KTAS (same visits)", "",
        "| | exact accuracy | kappa (linear) | kappa (quadratic) | under-triage | over-triage |",
        "|---|---|---|---|---|---|",
        row("model, decision rule (cross-fitted)", m["model"]),
        row("model, highest probability", m["model_argmax"]),
        row("triage nurse", m["nurse"]), "",
        "## Decision rule and trade-off", card["decision"]["rule"] + ".", "",
        "| beta | exact | kappa (linear) | under | over |", "|---|---|---|---|---|",
    ]
    for r in card["decision"]["trade_off"]:
        lines.append(f"| {r['beta']} | {_f(r['exact_accuracy'])} | {_f(r['kappa_linear'])} | "
                     f"{_f(r['under_triage'])} | {_f(r['over_triage'])} |")
    lines += [
        "", "## Second reader (nurse's level given)",
        f"P(under-triage) = sum of the probabilities of levels more urgent than the nurse's. AUROC for the "
        f"nurse's actual under-triage: {_f(sr['auroc_under_triage'])} (over-triage: {_f(sr['auroc_over_triage'])}). "
        f"Flag at P ≥ {sr['flag_threshold']:.3f}: cross-fitted, {sr['flag_rate']:.1%} of visits flagged, "
        f"sensitivity {sr['flag_sensitivity']:.2f}, PPV {sr['flag_ppv']:.2f} "
        f"({sr['nurse_under_triaged']} under-triaged visits).", "",
        "## Features", f"{len(card['features'])} features from `{card['mapping']['file']}`. Most important by "
        "gain: " + ", ".join(card["top_features_by_gain"]) + ".", "", "## Limitations",
    ]
    lines += [f"- {item}" for item in card["limitations"]]
    return "\n".join(lines) + "\n"
