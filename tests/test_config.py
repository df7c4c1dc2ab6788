"""Settings refused at start-up: numbers out of range name the setting (an OperationOutcome-like message, no
traceback), and 0 stays allowed where it means something."""
from __future__ import annotations

import pytest

from fhir_ai.config import load_settings
from fhir_ai.errors import ConfigurationError


@pytest.mark.parametrize("name, value, words", [
    ("WORKER_STALE_AFTER", "nan", "is not a number above 0"),
    ("WORKER_STALE_AFTER", "0", "is not a number above 0"),
    ("SOURCE_TIMEOUT", "-5", "is not a number above 0"),
    ("JOB_CHUNK_SIZE", "0", "is not a number above 0"),
    ("JOB_RETENTION", "-1", "is not a number of 0 or more"),
    ("JOB_RETENTION", "inf", "is not a number of 0 or more"),
    ("AUTH_LEEWAY", "nan", "is not a number of 0 or more"),
])
def test_numbers_out_of_range_are_refused_at_start_naming_the_setting(name: str, value: str, words: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(environ={f"FHIR_AI_{name}": value})
    assert caught.value.message.startswith(f"FHIR_AI_{name}: ")
    assert words in caught.value.message and caught.value.expression == [name.lower()]


def test_zero_stays_allowed_where_it_means_something() -> None:
    settings = load_settings(environ={"FHIR_AI_JOB_RETENTION": "0", "FHIR_AI_SOURCE_RETRIES": "0",
                                      "FHIR_AI_RESCORE_DEBOUNCE": "0", "FHIR_AI_AUTH_LEEWAY": "0"})
    assert settings.job_retention == 0 and settings.source_retries == 0 and settings.rescore_debounce == 0
