"""A ServerProfile's model server config: the profile's defaults, with the template's variables."""

from __future__ import annotations

from pathlib import Path

from pyworker.workers.engine_profile import ServerProfile


def test_the_defaults_apply_without_the_template_variables(tmp_path: Path) -> None:
    profile = ServerProfile(port=5001, health_path="/health", log_file=str(tmp_path / "no.log"))
    config = profile.model_server({})
    assert config.base_url == "http://127.0.0.1:5001"
    assert config.log_file is None  # no such file: readiness goes by the health route
    assert config.model_id is None


def test_the_template_variables_win_over_the_defaults(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_text("")
    profile = ServerProfile(
        port=5001,
        health_path="/health",
        log_file=str(log),
        model_variables=("MODEL_ID",),
        load_patterns=["ready"],
    )
    environ = {"MODEL_SERVER_PORT": "7000", "MODEL_ID": "org/model", "MODEL_LOAD_LOG_MSG": "up"}
    config = profile.model_server(environ)
    assert config.base_url == "http://127.0.0.1:7000"
    assert config.log_file == str(log)
    assert config.model_id == "org/model"
    assert config.load_patterns == ["up"]
    assert profile.model_server({**environ, "MODEL_NAME": "named"}).model_id == "named"
    assert profile.model_server(environ, model_id="chosen").model_id == "chosen"
