"""Start sekmet-fhir 0.1.1 for integration tests, with RiskAssessment search parameters registered.

Runs with the interpreter of sekmet's own virtualenv (never the project's): it imports sekmet,
FastAPI and uvicorn, whose pinned versions must not mix with fhir_ai's. Standard library otherwise.

    <sekmet-venv>/bin/python -I sekmet_launcher.py --host 127.0.0.1 --port 8123 --data-dir /tmp/x
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# sekmet 0.1.1 ships no RiskAssessment row in its search table, so every RiskAssessment search
# parameter would be ignored (with only a warning entry) and a search would match *all* of them.
# Format of sekmet.fhir.search_params: name -> (kind, element paths, reference target type).
# Paths walk through lists; choice types are listed one by one. Mirrors the R4 definitions
# (http://hl7.org/fhir/R4/riskassessment.html#search); probabilityRange is not a number in sekmet.
RISK_ASSESSMENT_PARAMS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "identifier": ("token", ("identifier",), None),
    "subject": ("reference", ("subject",), None),
    "patient": ("reference", ("subject",), "Patient"),
    "encounter": ("reference", ("encounter",), None),
    "condition": ("reference", ("condition",), None),
    "performer": ("reference", ("performer",), None),
    "method": ("token", ("method",), None),
    "date": ("date", ("occurrenceDateTime", "occurrencePeriod"), None),
    "risk": ("token", ("prediction.qualitativeRisk",), None),
    "probability": ("number", ("prediction.probabilityDecimal",), None),
}


def register_risk_assessment_params() -> None:
    """Add RiskAssessment to sekmet's search table (mutated in place: search, indexer and
    CapabilityStatement all hold the same dict object)."""
    from sekmet.fhir.search_params import PARAMS, SearchParam

    PARAMS["RiskAssessment"] = {
        name: SearchParam(name, kind, paths, target)
        for name, (kind, paths, target) in RISK_ASSESSMENT_PARAMS.items()
    }


def build_settings(host: str, port: int, data_dir: Path, validation: str):
    """sekmet Settings built explicitly, so no settings.yaml or SEKMET_* variable can leak in."""
    from sekmet.config import Settings, SimulatorSettings, ValidationSettings, set_settings

    settings = Settings(
        base_url=f"http://{host}:{port}/fhir",
        host=host,
        port=port,
        data_dir=str(data_dir),
        own_private_key_path=str(data_dir / "keys" / "sekmet_private.pem"),
        validation=ValidationSettings(inbound=validation),
        # The simulator answers orders/appointments with new resources after a delay; tests want a
        # server that only stores what they send.
        simulator=SimulatorSettings(enabled=False),
        # Every request body would be copied into sekmet's traffic table; not needed for tests.
        log_inbound=False,
    )
    set_settings(settings)
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--validation", choices=("strict", "warn", "off"), default="strict")
    args = parser.parse_args(argv)

    register_risk_assessment_params()
    import uvicorn
    from sekmet.main import create_app

    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(build_settings(args.host, args.port, data_dir, args.validation))
    logger.info("sekmet listening on http://%s:%d/fhir, data in %s", args.host, args.port, data_dir)
    # uvicorn handles SIGTERM/SIGINT with a graceful shutdown; sqlite commits every write, so
    # even a kill keeps the data.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
