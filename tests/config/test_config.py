from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyworker.config import RouteConfig, WorkerConfig
from pyworker.config.loader import ConfigError, load_config
from pyworker.protocol.workload import WorkloadError

TOML = """
name = "tgi"
[model_server]
base_url = "http://127.0.0.1:8080/"
health_path = "/health"

[[routes]]
path = "/generate"
workload = "parameters.max_new_tokens"
max_queue_time = 30.0

[[routes]]
path = "/generate_stream"
upstream_path = "/generate_stream"
fifo = true
"""


def test_toml_config_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(TOML)
    config = load_config(str(path), environ={})
    assert config.name == "tgi"
    assert config.model_server.base_url == "http://127.0.0.1:8080"
    first, second = config.routes
    assert first.model_path == "/generate" and first.concurrency_limit is None
    assert second.concurrency_limit == 1
    assert config.max_body_size == 32 * 1024 * 1024


def test_env_and_cli_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(TOML)
    environ = {"MODEL_LOG": "/tmp/model.log", "MODEL_HEALTH_ENDPOINT": "/ready"}
    config = load_config(
        str(path),
        ["routes.0.max_queue_time=5", "model_server.base_url=http://10.0.0.1:9", "perf=12.5"],
        environ,
    )
    assert config.routes[0].max_queue_time == 5
    assert config.model_server.base_url == "http://10.0.0.1:9"
    assert config.model_server.log_file == "/tmp/model.log"
    assert config.model_server.health_path == "/ready"
    assert config.perf == 12.5


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("routes.0.max_queue_time=-1", "routes.0.max_queue_time"),
        ("routes.1.path=generate", "routes.1.path"),
        ("model_server.base_url=ftp://x", "model_server.base_url"),
        ("routes.0.colour=blue", "routes.0.colour"),
        ("max_body_size=10", "max_body_size"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, override: str, named: str) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(TOML)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), [override], {})
    assert named in str(caught.value)


def test_duplicate_routes_and_missing_routes_are_refused() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        WorkerConfig.model_validate({"routes": [{"path": "/a"}, {"path": "/a"}]})
    with pytest.raises(ValueError, match="routes"):
        WorkerConfig.model_validate({})


def test_bad_toml_and_missing_targets(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[[routes]\npath=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(broken), environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_worker_anywhere", environ={})
    valid = tmp_path / "valid.toml"
    valid.write_text(TOML)
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        load_config(str(valid), ["nonsense"], {})
    with pytest.raises(ConfigError, match="out of range"):
        load_config(str(valid), ["routes.5.path=/x"], {})


def test_python_config_and_workers_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "workers" / "mine"
    folder.mkdir(parents=True)
    (folder / "worker.py").write_text(
        "from pyworker.config import WorkerConfig, RouteConfig\n"
        "def tokens(payload):\n"
        "    return payload['n'] * 2\n"
        "worker = WorkerConfig(name='mine', routes=[RouteConfig(path='/x', workload=tokens)])\n"
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("mine", ["routes.0.fifo=true"], {})
    assert config.name == "mine" and config.routes[0].fifo
    assert config.routes[0].compute_workload({"n": 4}, cost=0) == 8
    assert load_config(str(folder / "worker.py"), environ={}).name == "mine"
    assert load_config(str(folder), environ={}).name == "mine"


def test_python_file_without_worker_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.py"
    path.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no"):
        load_config(str(path), environ={})


def _route(**fields: Any) -> RouteConfig:
    return RouteConfig.model_validate({"path": "/r", **fields})


def test_workload_rules() -> None:
    payload = {"max_tokens": 64, "parameters": {"steps": 30}, "text": "x", "flag": True}
    assert _route().compute_workload(payload, 5) == 1.0
    assert _route(workload=3).compute_workload(payload, 5) == 3.0
    assert _route(workload="cost").compute_workload(payload, 5) == 5.0
    assert _route(workload="max_tokens").compute_workload(payload, 5) == 64
    assert _route(workload="parameters.steps").compute_workload(payload, 5) == 30
    fallback = {"default_workload": 7}
    for rule in ("missing", "parameters.steps.deeper"):
        assert _route(workload=rule, **fallback).compute_workload(payload, 5) == 7

    def broken(payload: dict[str, Any]) -> float:
        raise KeyError("n")

    assert _route(workload=broken, **fallback).compute_workload(payload, 5) == 7
    assert _route(workload=lambda p: None, **fallback).compute_workload(payload, 5) == 7
    with pytest.raises(ValueError, match="finite"):
        _route(workload=-1.0)


def test_an_unusable_workload_is_refused_naming_its_source() -> None:
    """Present but not a finite number from 0 to max_workload: WorkloadError, never a guess."""
    payload = {"text": "x", "flag": True, "huge": 1e308, "negative": -1, "big": 2e9, "ok": 5}
    for field in ("text", "flag", "huge", "negative", "big"):
        with pytest.raises(WorkloadError) as caught:
            _route(workload=field).compute_workload(payload, 5)
        assert set(caught.value.fields()["payload"]) == {field}
    for result in (float("nan"), float("inf"), -3, 10**400, True, "7"):
        with pytest.raises(WorkloadError) as caught:
            _route(workload=lambda p, r=result: r).compute_workload(payload, 5)
        assert "workload" in caught.value.fields()["payload"]
    with pytest.raises(WorkloadError) as caught:
        _route(workload="cost", max_workload=4).compute_workload(payload, 5)
    assert caught.value.fields() == {"auth_data": {"cost": "must be a finite number from 0 to 4"}}
    assert _route(workload="ok", max_workload=5).compute_workload(payload, 5) == 5
    with pytest.raises(ValueError, match="over max_workload"):
        _route(workload=10.0, max_workload=5)
    with pytest.raises(ValueError, match="over max_workload"):
        _route(default_workload=10.0, max_workload=5)
    with pytest.raises(ValueError):
        _route(max_workload=2e9)
