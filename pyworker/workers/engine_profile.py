"""An engine's defaults as Vast's template starts it, and the model server config they make.

The OpenAI-compatible engines (openai/engines.py), TGI on its native API and the ComfyUI API
wrapper are each started by Vast's image on a fixed port, maybe with a log file, and name the
served model in a variable of their own. A `ServerProfile` holds those defaults and the log
lines that say the engine loaded or failed; `model_server` applies the template's variables
(pyworker.config.template_env) to them in one place, the same way for every worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pyworker.config import ModelServerConfig, Pattern
from pyworker.config.template_env import engine_url, existing_log, log_grammar, served_model


@dataclass(frozen=True)
class ServerProfile:
    """What tells that one kind of server is loaded, alive, or broken, and where it is."""

    port: int
    health_path: str
    log_file: str | None = None
    """Where Vast's template writes the engine's output; used when that file exists."""
    model_variables: tuple[str, ...] = ()
    """The engine's own variable naming the served model, read after `MODEL_NAME`."""
    load_patterns: list[Pattern] = field(default_factory=list)
    error_patterns: list[Pattern] = field(default_factory=list)
    info_patterns: list[Pattern] = field(default_factory=list)

    def model_server(
        self, environ: Mapping[str, str], model_id: str | None = None
    ) -> ModelServerConfig:
        """The model server part of the config: these defaults, with the template's variables.

        `model_id`: the served model when the worker has its own way to name it; None reads
        `MODEL_NAME`, else the profile's `model_variables`.
        """
        grammar = log_grammar(environ, self.load_patterns, self.error_patterns, self.info_patterns)
        return ModelServerConfig(
            base_url=engine_url(environ, self.port),
            log_file=existing_log(self.log_file),
            health_path=self.health_path,
            model_id=model_id or served_model(environ, self.model_variables),
            load_patterns=grammar.load,
            error_patterns=grammar.error,
            info_patterns=grammar.info,
        )
