"""The ready workers in an installed pyworker: the wheel claims no top-level name but `pyworker`,
and `pyworker run <name>` still finds every worker and its dataset from any folder.

The wheel is built offline from the working tree and installed (not editable) into a folder of
its own, which a fresh interpreter puts first on its path; the repository's root `workers/`
(Vast's entry points) is nowhere on that path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.wheelhouse import build_wheel, copy_working_tree

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ["vllm", "sglang", "llama", "openai", "tgi", "comfyui-json", "vllm-score"]
OWN_WORKERS = ["hello_world", "comfyui", "textgen"]

RESOLVE = """
import json, sys
import pyworker
from pyworker.config.loader import load_config
configs = {name: load_config(name, environ={}) for name in sys.argv[1:]}
print(json.dumps({
    "pyworker": pyworker.__file__,
    "configs": {name: [c.name, c.benchmark.dataset_file] for name, c in configs.items()},
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = copy_working_tree(ROOT, tmp_path_factory.mktemp("source"))
    return build_wheel(source, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed as pip installs it, in a folder of its own."""
    folder = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--target", str(folder), str(wheel)],
        env=os.environ | {"PIP_CONFIG_FILE": os.devnull},
        capture_output=True, check=True, timeout=300,
    )  # fmt: skip
    return folder


def run_installed(site: Path, cwd: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PYWORKER_", "MODEL_", "OPENAI_", "BENCHMARK_"))
        and name not in ("CONTAINER_ID", "REPORT_ADDR", "BACKEND", "PYTHONPATH")
    }
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=cwd, env=environ | {"PYTHONPATH": str(site)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_wheel_holds_only_pyworker_with_its_workers_and_their_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"pyworker", "pyworker_serverless-0.1.0.dist-info"}
    for data in [
        "pyworker/workers/hello_world/benchmark.jsonl",
        "pyworker/workers/openai/benchmark.jsonl",
        "pyworker/workers/tgi/benchmark.jsonl",
        "pyworker/workers/vllm_score/benchmark.jsonl",
        "pyworker/workers/comfyui/benchmark.json",
        "pyworker/workers/comfyui_json/prompts.json",
        "pyworker/workers/openai/README.md",
        "pyworker/workers/textgen/corpus.txt",
    ]:
        assert data in names


def test_pyworker_run_finds_each_worker_from_an_installed_pyworker(
    site: Path, tmp_path: Path
) -> None:
    assert not (site / "workers").exists()
    done = run_installed(site, tmp_path, "-c", RESOLVE, *BACKENDS, *OWN_WORKERS)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["pyworker"]).is_relative_to(site)  # the installed copy, not this tree
    configs = found["configs"]
    assert configs["vllm"][0] == "openai-vllm"
    assert configs["comfyui-json"][0] == "comfyui-json"
    assert configs["vllm-score"][0] == "vllm-score"
    dataset = Path(configs["hello_world"][1])
    assert dataset == site / "pyworker" / "workers" / "hello_world" / "benchmark.jsonl"
    assert dataset.is_file()


def test_an_unknown_name_lists_the_installed_workers_by_their_backend_names(
    site: Path, tmp_path: Path
) -> None:
    done = run_installed(site, tmp_path, "-m", "pyworker", "run", "hello-world", "--port", "0")
    assert done.returncode == 2
    assert "did you mean 'hello_world'?" in done.stderr
    listed = (
        "comfyui, comfyui-json, hello_world, llama, openai, sglang, textgen, tgi, vllm, vllm-score"
    )
    assert f"workers there: {listed}\n" in done.stderr
