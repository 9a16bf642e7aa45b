"""What runs around the worker reads: the container entrypoint and the developer commands."""

from __future__ import annotations

from pyworker.config.variables.row import Reader, Variable

SCRIPT_VARIABLES: tuple[Variable, ...] = (
    # --- the start script ----------------------------------------------------------------------
    Variable(
        "PYWORKER_WORKER",
        "`BACKEND`",
        "The worker to run: a `workers/` folder name or a config file path (required, or "
        "`BACKEND`).",
        Reader.START_SCRIPT,
    ),
    Variable(
        "BACKEND",
        "unset",
        "The reference worker's name for the same thing; used when `PYWORKER_WORKER` is unset.",
        Reader.START_SCRIPT,
    ),
    Variable(
        "MODEL_SERVER_CMD",
        "unset: only the worker runs",
        "A shell command that starts the model server (run with `bash -c`), its output into "
        "`MODEL_LOG`.",
        Reader.START_SCRIPT,
    ),
    Variable(
        "PYWORKER_CMD",
        "unset: pyworker from `PYWORKER_VENV`",
        "The command that runs pyworker, split on blanks; when set it is used as is and nothing "
        "is installed.",
        Reader.START_SCRIPT,
    ),
    Variable(
        "PYWORKER_VENV",
        "`$WORKSPACE/pyworker-venv`, else `/opt/pyworker/venv`",
        "The venv pyworker is installed into and run from.",
        Reader.START_SCRIPT,
    ),
    Variable("WORKSPACE", "unset", "See `PYWORKER_VENV`.", Reader.START_SCRIPT),
    Variable(
        "PYWORKER_SOURCE",
        "the folder above the script",
        "What `pip install` installs pyworker from: a folder, wheel, VCS URL or requirement.",
        Reader.START_SCRIPT,
    ),
    Variable(
        "PYWORKER_PIP_ARGS",
        "unset",
        "Extra `pip install` arguments, split on blanks (e.g. `--no-index --find-links /wheels`).",
        Reader.START_SCRIPT,
    ),
    Variable(
        "PYWORKER_PYTHON",
        "the venv's python (`python3` when `PYWORKER_CMD` is set)",
        "The Python that runs the certificate step when `USE_SSL=true`.",
        Reader.START_SCRIPT,
    ),
    # --- developer commands --------------------------------------------------------------------
    Variable(
        "XDG_RUNTIME_DIR",
        "unset",
        "`pyworker dev` also records its session under `$XDG_RUNTIME_DIR/pyworker/`, where "
        "`pyworker call` and `pyworker load` find it from any folder.",
        Reader.TOOLS,
    ),
)
