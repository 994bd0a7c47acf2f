"""The settings class: bad values fail with a message naming the field, lists are
comma-separated, every field is documented."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from marginwatch.service.__main__ import settings_from
from marginwatch.service.settings import DEFAULT_TRAFFIC_SAMPLE_RATE, Settings


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"MARGINWATCH_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"MARGINWATCH_PORT": "70000"}, "port"),
        ({"MARGINWATCH_MAX_BATCH_WAIT_S": "-1"}, "max_batch_wait_s"),
        ({"MARGINWATCH_MAX_INPUTS_PER_REQUEST": "128"}, "must not exceed max_batch_size"),
        ({"MARGINWATCH_API_KEYS": "short"}, "at least 8 characters"),
        ({"MARGINWATCH_LOG_FORMAT": "xml"}, "log_format"),
        ({"MARGINWATCH_MAX_INFLIGHT_REQUESTS": "0"}, "max_inflight_requests"),
        (
            {"MARGINWATCH_MAX_BATCH_WAIT_S": "0.5", "MARGINWATCH_REQUEST_TIMEOUT_S": "0.5"},
            "must be below request_timeout_s",
        ),
    ],
)
def test_bad_settings_fail_with_a_message(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], words: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=words):
        Settings()


def test_settings_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARGINWATCH_MODELS", "a, b,c")
    monkeypatch.setenv("MARGINWATCH_API_KEYS", "key-number-1,key-number-2")
    settings = Settings()
    assert settings.models == ["a", "b", "c"]
    assert [key.get_secret_value() for key in settings.api_keys] == ["key-number-1", "key-number-2"]


def test_every_setting_is_documented() -> None:
    assert len(Settings.model_fields) >= 20
    for name, field in Settings.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize(
    ("env", "rate"),
    [
        ({}, 0.0),  # off by default
        ({"MARGINWATCH_TRAFFIC_DIR": "t"}, 0.01),  # the folder alone turns it on
        ({"MARGINWATCH_TRAFFIC_DIR": "t", "MARGINWATCH_TRAFFIC_SAMPLE_RATE": "0.5"}, 0.5),
        ({"MARGINWATCH_TRAFFIC_DIR": "t", "MARGINWATCH_TRAFFIC_SAMPLE_RATE": "0"}, 0.0),
    ],
)
def test_the_traffic_folder_alone_samples_at_the_default_rate(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], rate: float
) -> None:
    for key in ("MARGINWATCH_TRAFFIC_DIR", "MARGINWATCH_TRAFFIC_SAMPLE_RATE"):
        monkeypatch.delenv(key, raising=False)
    for key, setting in env.items():
        monkeypatch.setenv(key, setting)
    assert Settings().traffic_sample_rate == rate
    assert settings_from([]).traffic_sample_rate == rate  # the command line's defaults agree


def test_a_traffic_folder_flag_alone_samples_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MARGINWATCH_TRAFFIC_DIR", raising=False)
    monkeypatch.delenv("MARGINWATCH_TRAFFIC_SAMPLE_RATE", raising=False)
    assert settings_from(["--traffic-dir", "t"]).traffic_sample_rate == DEFAULT_TRAFFIC_SAMPLE_RATE
    explicit = ["--traffic-dir", "t", "--traffic-sample-rate", "0"]
    assert settings_from(explicit).traffic_sample_rate == 0.0
