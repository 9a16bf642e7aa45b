"""What Vast's templates tell a worker about the engine beside it, through the environment.

Vast's images start the engine (vLLM, SGLang, llama.cpp, TGI, the ComfyUI API wrapper) on a
fixed loopback port, write its output to a file under `/var/log/portal/`, and name the served
model in `MODEL_NAME` (or the engine's own variable: `VLLM_MODEL`, `MODEL_ID`, ...). The image
may also replace the worker's log grammar, one substring a line, in `MODEL_LOAD_LOG_MSG`,
`MODEL_ERROR_LOG_MSGS` and `MODEL_INFO_LOG_MSGS`. These helpers read those variables the same
way for every worker; `MODEL_SERVER_URL`, `MODEL_LOG` and `MODEL_HEALTH_ENDPOINT` are applied
later by the loader and win over any default set here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pyworker.config import Pattern

LOOPBACK = "127.0.0.1"
PORT_VARIABLE = "MODEL_SERVER_PORT"
MODEL_VARIABLE = "MODEL_NAME"
LOAD_LINES_VARIABLE = "MODEL_LOAD_LOG_MSG"
ERROR_LINES_VARIABLE = "MODEL_ERROR_LOG_MSGS"
INFO_LINES_VARIABLE = "MODEL_INFO_LOG_MSGS"
MAX_PATTERNS = 64
"""Lines taken from one log-grammar variable; a longer value is a mistake, not a grammar."""


class TemplateEnvError(ValueError):
    """A template variable has a value the worker cannot use; the message names it."""


@dataclass(frozen=True)
class LogGrammar:
    """The lines that say the engine loaded, failed, or did something worth echoing."""

    load: list[Pattern]
    error: list[Pattern]
    info: list[Pattern]


def env_lines(environ: Mapping[str, str], name: str) -> list[str] | None:
    """A newline-separated variable as stripped, non-empty lines; None when unset or blank.

    Lines are stripped because a YAML block or heredoc value carries indentation, and a
    pattern is matched as a substring.
    """
    lines = [line.strip() for line in environ.get(name, "").splitlines()]
    kept = [line for line in lines if line]
    if not kept:
        return None
    if len(kept) > MAX_PATTERNS:
        raise TemplateEnvError(f"{name}: {len(kept)} lines, at most {MAX_PATTERNS}")
    return kept


def log_grammar(
    environ: Mapping[str, str],
    load: Sequence[Pattern],
    error: Sequence[Pattern],
    info: Sequence[Pattern] = (),
) -> LogGrammar:
    """The engine's defaults, each list replaced by its variable when the image sets it."""

    def pick(name: str, default: Sequence[Pattern]) -> list[Pattern]:
        lines = env_lines(environ, name)
        return list(default) if lines is None else list(lines)

    return LogGrammar(
        load=pick(LOAD_LINES_VARIABLE, load),
        error=pick(ERROR_LINES_VARIABLE, error),
        info=pick(INFO_LINES_VARIABLE, info),
    )


def first_set(environ: Mapping[str, str], names: Iterable[str]) -> str | None:
    """The value of the first variable in `names` that is set and not blank."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def served_model(environ: Mapping[str, str], engine_variables: Sequence[str] = ()) -> str | None:
    """The served model's name: `MODEL_NAME`, else the engine's own variable."""
    return first_set(environ, (MODEL_VARIABLE, *engine_variables))


def engine_url(environ: Mapping[str, str], default_port: int) -> str:
    """`http://127.0.0.1:<port>`, the port from `MODEL_SERVER_PORT` when set."""
    raw = environ.get(PORT_VARIABLE, "").strip()
    if not raw:
        return f"http://{LOOPBACK}:{default_port}"
    if not raw.isdigit() or not 0 < int(raw) <= 65535:
        raise TemplateEnvError(f"{PORT_VARIABLE}={raw!r} is not a TCP port (1-65535)")
    return f"http://{LOOPBACK}:{int(raw)}"


def existing_log(path: str | None, exists: Callable[[str], bool] = os.path.exists) -> str | None:
    """The template's log path when that file is there, so that off the platform (no such
    file) readiness falls back to the health route instead of waiting on a missing log."""
    return path if path and exists(path) else None
