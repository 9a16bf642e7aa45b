"""Finding a worker config, and what `pyworker run` says when it cannot: the workers there are,
the closest name, a dataset file next to its TOML config, checked before anything starts."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from pyworker.config.loader import ConfigError, available_workers, load_config

CONFIG = """
name = "toml-worker"
[model_server]
base_url = "http://127.0.0.1:9"
[[routes]]
path = "/echo"
[benchmark]
dataset_file = "{dataset}"
"""


def write_config(folder: Path, dataset: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "worker.toml"
    config.write_text(CONFIG.format(dataset=dataset))
    return config


async def run(*arguments: str, cwd: Path) -> tuple[int, str]:
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in ("CONTAINER_ID", "REPORT_ADDR", "PYWORKER_WORKERS_DIR")
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", "run", *arguments, "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd, env=environ,
    )  # fmt: skip
    output, errors = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, (output + errors).decode()


# --- a wrong worker name --------------------------------------------------------------------
async def test_an_unknown_worker_lists_the_workers_and_the_closest_name(tmp_path: Path) -> None:
    status, text = await run("hello-world", cwd=tmp_path)
    assert status == 2
    assert "worker 'hello-world' not found" in text
    assert "did you mean 'hello_world'?  pyworker run hello_world" in text
    listed = (
        "comfyui, comfyui-json, hello_world, llama, openai, sglang, textgen, tgi, vllm, vllm-score"
    )
    assert f"workers there: {listed}\n" in text
    assert "listening" not in text


def test_available_workers_are_the_folders_with_a_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = tmp_path / "mine"
    (extra / "speech").mkdir(parents=True)
    (extra / "speech" / "worker.toml").write_text('[[routes]]\npath = "/x"\n')
    (extra / "notes").mkdir()  # no config: not a worker
    monkeypatch.setenv("PYWORKER_WORKERS_DIR", str(extra))
    names = available_workers()
    assert "speech" in names and "hello_world" in names and "notes" not in names
    with pytest.raises(ConfigError, match="did you mean 'speech'"):
        load_config("speeech")


def test_a_module_missing_a_dependency_is_not_called_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "needs_more.py").write_text("import not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="import failed: No module named 'not_installed_any"):
        load_config("needs_more")


# --- the dataset file -----------------------------------------------------------------------
def test_a_toml_dataset_file_is_read_next_to_the_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "configs"
    config = write_config(folder, "data/bench.jsonl")
    (folder / "data").mkdir()
    (folder / "data" / "bench.jsonl").write_text('{"prompt": "a"}\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_config(str(config))
    assert loaded.benchmark.dataset_file == str(folder / "data" / "bench.jsonl")
    # --set names a file from the current folder, as any command-line path.
    (elsewhere / "mine.jsonl").write_text('{"prompt": "b"}\n')
    overridden = load_config(str(config), ["benchmark.dataset_file=mine.jsonl"])
    assert overridden.benchmark.dataset_file == "mine.jsonl"


async def test_a_missing_dataset_file_stops_the_start_with_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path / "configs", "bench.jsonl")
    status, text = await run(str(config), cwd=tmp_path)
    assert status == 2, text
    missing = tmp_path / "configs" / "bench.jsonl"
    assert f"benchmark.dataset_file: benchmark dataset {missing}: No such file" in text
    assert "read from the TOML file's folder" in text
    assert "listening" not in text


PY_CONFIG = """
from pyworker.config import WorkerConfig
from pyworker.entry import serve

worker = WorkerConfig.model_validate({
    "model_server": {"base_url": "http://127.0.0.1:9"},
    "routes": [{"path": "/echo"}],
    "benchmark": {"dataset_file": "bench.jsonl"},
})

if __name__ == "__main__":
    serve(worker)
"""


@pytest.mark.parametrize("how", ["pyworker run worker.py", "pyworker run <folder>", "python"])
async def test_a_missing_dataset_file_of_a_worker_py_gets_a_worker_py_hint(
    tmp_path: Path, how: str
) -> None:
    folder = tmp_path / "workers" / "mine"
    folder.mkdir(parents=True)
    (folder / "worker.py").write_text(PY_CONFIG)
    (folder / "bench.jsonl").write_text('{"prompt": "beside the worker.py"}\n')
    if how == "python":
        environ = {k: v for k, v in os.environ.items() if k not in ("CONTAINER_ID", "REPORT_ADDR")}
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(folder / "worker.py"), stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path, env=environ,
        )  # fmt: skip
        _, errors = await asyncio.wait_for(process.communicate(), 30)
        status, text = process.returncode, errors.decode()
    else:
        target = str(folder / "worker.py") if how.endswith("worker.py") else "mine"
        status, text = await run(target, cwd=tmp_path)
    assert status == 2, text
    assert "benchmark dataset bench.jsonl: No such file" in text
    current = f"is read from the current folder, {tmp_path}"
    assert f"a relative path in worker.py (or given with --set) {current}" in text
    assert "Path(__file__).parent" in text
    assert "TOML" not in text


async def test_a_dataset_line_that_is_not_json_stops_the_start_naming_file_and_line(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "bench.jsonl")
    (tmp_path / "bench.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b",\n{"prompt": "c"}\n')
    status, text = await run(str(config), cwd=tmp_path)
    assert status == 2, text
    assert f"benchmark dataset {tmp_path / 'bench.jsonl'}, line 3: not JSON" in text
    assert "listening" not in text


def test_a_known_perf_or_inline_dataset_needs_no_dataset_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, "absent.jsonl")
    assert load_config(str(config), ["perf=10"]).perf == 10
    inline = load_config(str(config), ['benchmark.dataset=[{"a": 1}]'])
    assert inline.benchmark.dataset == [{"a": 1}]
