"""The process environment (docs/protocol.md), read once at start-up into a typed model.

A worker on Vast.ai is told everything through environment variables. Off the platform (no
`CONTAINER_ID` and no `REPORT_ADDR`) the worker runs in *local mode*: it reports nowhere,
cannot fetch an autoscaler key and so skips signatures, and listens on loopback only, so that
an unsigned worker is never exposed by accident.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from pyworker.config.load_deadline import (
    DEFAULT_LOAD_TIMEOUT,
    DEFAULT_RELOAD_TIMEOUT,
    LOAD_VARIABLE,
    RELOAD_VARIABLE,
    LoadDeadline,
)
from pyworker.protocol.messages import DEFAULT_REPORT_ADDR, PUBKEY_PATH, TRUE_WORDS, public_url

CONFIG_VARIABLES = {
    "MODEL_SERVER_URL": "model_server.base_url",
    "MODEL_LOG": "model_server.log_file",
    "MODEL_HEALTH_ENDPOINT": "model_server.health_path",
}
"""Variables that override a worker config key (docs/protocol.md), by the key they set."""
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})
Number = TypeVar("Number", int, float)


class InvalidEnvironment(ValueError):
    """An environment variable has a value the worker cannot use."""


def _flag(environ: Mapping[str, str], name: str) -> bool | None:
    raw = environ.get(name)
    if raw is None:
        return None
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise InvalidEnvironment(f"{name}={raw!r} is not a boolean (use true or false)")


def read_number(
    environ: Mapping[str, str], name: str, kind: type[Number], what: str
) -> Number | None:
    """The variable read as `kind`, None when unset or blank; one parser for every module."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise InvalidEnvironment(f"{name}={raw!r} is not {what}") from None


def _integer(environ: Mapping[str, str], name: str) -> int | None:
    return read_number(environ, name, int, "an integer")


def _seconds(environ: Mapping[str, str], name: str) -> float | None:
    value = read_number(environ, name, float, "a number of seconds")
    if value is not None and not 0 <= value < float("inf"):
        raise InvalidEnvironment(f"{name}={environ[name].strip()!r} must be a finite number >= 0")
    return value


def _positive(environ: Mapping[str, str], name: str) -> float | None:
    value = _seconds(environ, name)
    if value == 0:
        raise InvalidEnvironment(f"{name}=0: it must be a number of seconds above 0")
    return value


def _at_least(environ: Mapping[str, str], name: str, minimum: int) -> int | None:
    value = _integer(environ, name)
    if value is not None and value < minimum:
        raise InvalidEnvironment(f"{name}={value} must be at least {minimum}")
    return value


def _port(environ: Mapping[str, str], name: str) -> int | None:
    value = _integer(environ, name)
    if value is not None and not 0 <= value <= 65535:
        raise InvalidEnvironment(f"{name}={value} is not a TCP port (0-65535)")
    return value


def config_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """The worker config keys that `CONFIG_VARIABLES` set here, with their values."""
    return {key: environ[name] for name, key in CONFIG_VARIABLES.items() if environ.get(name)}


def _report_addresses(environ: Mapping[str, str], *, local: bool) -> tuple[str, ...]:
    """REPORT_ADDR's entries; the default address unless local (no CONTAINER_ID either)."""
    raw = environ.get("REPORT_ADDR", "").strip()
    if local and not raw:
        return ()
    entries = tuple(a.strip().rstrip("/") for a in (raw or DEFAULT_REPORT_ADDR).split(","))
    addresses = tuple(address for address in entries if address)
    for address in addresses:
        if not address.startswith(("http://", "https://")):
            raise InvalidEnvironment(f"REPORT_ADDR entry {address!r} is not an http(s) URL")
    return addresses


class Environment(BaseModel):
    """What the platform told this worker. Build it with `Environment.from_env()`."""

    model_config = ConfigDict(frozen=True)

    worker_port: int = Field(default=3000, ge=0, le=65535)
    worker_http_port: int = Field(default=3001, ge=0, le=65535)
    """The plain-HTTP side port serving `/session/end` only (WORKER_HTTP_PORT)."""
    worker_http_host: str = "127.0.0.1"
    """Where the side port listens (WORKER_HTTP_HOST): loopback unless told otherwise."""
    host: str = "127.0.0.1"
    host_chosen: bool = False
    """WORKER_HOST (or `--host`) was given: the listen address is someone's choice."""
    public_ipaddr: str | None = None
    public_port: int | None = None
    use_ssl: bool = False
    report_addr: tuple[str, ...] = ()
    container_id: int = 0
    master_token: SecretStr | None = None
    unsecured: bool = True
    local: bool = True
    config_overrides: dict[str, str] = Field(default_factory=dict)
    """Worker config keys set by the platform's variables (`CONFIG_VARIABLES`), e.g.
    `{"model_server.log_file": MODEL_LOG}`; pyworker.config.loader applies them."""
    tls_cert_file: str = "/etc/instance.crt"
    tls_key_file: str = "/etc/instance.key"
    grace_period: float = Field(default=30.0, ge=0)
    """Seconds a draining worker waits for requests in flight (PYWORKER_GRACE)."""
    update_marker: str = "/.force_update"
    """The file `/pyworker/update` writes; the start script reinstalls when it exists."""
    strict_auth: bool = False
    verify_url: bool = True
    """Refuse auth_data signed for another address than this worker's (PYWORKER_VERIFY_URL;
    false behind a proxy that rewrites the address: docs/security.md)."""
    """Verify strict signatures, each auth_data once (PYWORKER_STRICT_AUTH; docs/security.md)."""
    report_interval: float = Field(default=1.0, gt=0)
    """Seconds between reports while something changes (PYWORKER_REPORT_INTERVAL)."""
    body_timeout: float = Field(default=60.0, gt=0)
    """Seconds a client may take to send a request body before 408 (PYWORKER_BODY_TIMEOUT)."""
    max_connections: int | None = Field(default=None, ge=1)
    """A lower cap on client connections than the descriptor limit allows
    (PYWORKER_MAX_CONNECTIONS; pyworker.serving.connections)."""
    max_unverified_bytes: int | None = Field(default=None, ge=1024)
    """Bytes of request bodies held before their signature is checked, all clients together
    (PYWORKER_MAX_UNVERIFIED_BYTES; default 64 MiB or two of the largest bodies)."""
    keepalive_timeout: float = Field(default=75.0, gt=0)
    """Seconds an idle connection, or one still sending its headers, is kept
    (PYWORKER_KEEPALIVE_TIMEOUT)."""
    load_timeout: float = Field(default=DEFAULT_LOAD_TIMEOUT, ge=0)
    """Seconds a first start waits for the model to load before ERRORED; 0: no deadline
    (PYWORKER_LOAD_TIMEOUT)."""
    reload_timeout: float = Field(default=DEFAULT_RELOAD_TIMEOUT, ge=0)
    """The same for a restart where this model loaded before (PYWORKER_RELOAD_TIMEOUT)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Environment:
        """Parse the variables; one left unset (or empty) keeps the field's default."""
        env = os.environ if environ is None else environ
        container_id = _integer(env, "CONTAINER_ID")
        local = container_id is None and not env.get("REPORT_ADDR", "").strip()
        report_addr = _report_addresses(env, local=local)
        unsecured = _flag(env, "UNSECURED")
        strict_auth = bool(_flag(env, "PYWORKER_STRICT_AUTH"))
        if strict_auth and unsecured:
            raise InvalidEnvironment("PYWORKER_STRICT_AUTH=true contradicts UNSECURED=true")
        if unsecured is None:
            unsecured = local and not strict_auth
        if not unsecured and not report_addr:
            setting = "PYWORKER_STRICT_AUTH=true" if strict_auth else "UNSECURED=false"
            raise InvalidEnvironment(
                f"{setting} needs REPORT_ADDR: the public key comes from its {PUBKEY_PATH}"
            )
        port = _port(env, "WORKER_PORT")
        if port is None:
            port = cls.model_fields["worker_port"].default
        http_port = _port(env, "WORKER_HTTP_PORT")
        if http_port is None:
            http_port = port + 1 if 0 < port < 65535 else 0  # port 0: any free port for both
        token = env.get("MASTER_TOKEN")
        values = {
            "worker_port": port,
            "worker_http_port": http_port,
            "worker_http_host": env.get("WORKER_HTTP_HOST"),
            "host": env.get("WORKER_HOST") or (None if local else "0.0.0.0"),
            "host_chosen": bool(env.get("WORKER_HOST")),
            "public_ipaddr": env.get("PUBLIC_IPADDR"),
            "public_port": _port(env, f"VAST_TCP_PORT_{port}"),
            "use_ssl": bool(_flag(env, "USE_SSL")),
            "report_addr": report_addr,
            "container_id": container_id,
            "master_token": SecretStr(token) if token else None,
            "unsecured": unsecured,
            "local": local,
            "config_overrides": config_overrides(env),
            "tls_cert_file": env.get("TLS_CERT_FILE"),
            "tls_key_file": env.get("TLS_KEY_FILE"),
            "grace_period": _seconds(env, "PYWORKER_GRACE"),
            "update_marker": env.get("PYWORKER_UPDATE_MARKER"),
            "strict_auth": strict_auth,
            "verify_url": _flag(env, "PYWORKER_VERIFY_URL") is not False,
            "report_interval": _positive(env, "PYWORKER_REPORT_INTERVAL"),
            "body_timeout": _positive(env, "PYWORKER_BODY_TIMEOUT"),
            "keepalive_timeout": _positive(env, "PYWORKER_KEEPALIVE_TIMEOUT"),
            "load_timeout": _seconds(env, LOAD_VARIABLE),
            "reload_timeout": _seconds(env, RELOAD_VARIABLE),
            "max_connections": _at_least(env, "PYWORKER_MAX_CONNECTIONS", 1),
            "max_unverified_bytes": _at_least(env, "PYWORKER_MAX_UNVERIFIED_BYTES", 1024),
        }
        return cls(**{name: value for name, value in values.items() if value not in (None, "")})

    @property
    def load_deadline(self) -> LoadDeadline:
        return LoadDeadline(first_start=self.load_timeout, restart=self.reload_timeout)

    def public_url(self, bound_port: int | None = None) -> str:
        """The worker's address as the autoscaler hands it to clients: PUBLIC_IPADDR, or where
        it listens (loopback for any address), and VAST_TCP_PORT_<port>, or the bound port."""
        host = self.public_ipaddr or ("127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host)
        port = self.public_port or bound_port or self.worker_port
        return public_url(host, port, use_ssl=self.use_ssl)
