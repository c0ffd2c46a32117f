"""`slm-server`'s command line: each flag sets the setting of the same name over the environment, and a
value the settings refuse is a clear message and exit status 2 before anything starts (the running server
is tested through the real process in test_process.py)."""

from __future__ import annotations

import pytest

from slm_server.cli import main, parse_args
from slm_server.settings import Settings


def test_flags_set_the_settings_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_PORT", "9100")
    monkeypatch.setenv("SLM_MAX_CONCURRENT_REQUESTS", "4")
    settings = Settings(**parse_args([  # type: ignore[arg-type]
        "--model", "/models/tiny", "--served-model-name", "tiny", "--port", "9200", "--engine", "echo",
        "--max-queued-requests", "3", "--request-timeout-seconds", "2.5", "--no-metrics",
    ]))
    assert (settings.model, settings.served_model_name, settings.port) == ("/models/tiny", "tiny", 9200)
    assert (settings.engine, settings.max_queued_requests, settings.request_timeout_seconds) == ("echo", 3, 2.5)
    assert settings.metrics_enabled is False
    assert settings.max_concurrent_requests == 4  # no flag given: the environment's value stands


def test_a_value_the_settings_refuse_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm-server: invalid settings:") and "port" in err


def test_a_value_outside_the_choices_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--dtype", "int3"])
    assert exited.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err
