"""What `pyworker run` reads: set by the platform, pyworker's own settings, config overrides.

Parsing: pyworker.config.environment, and pyworker.config.loader for the overrides.
"""

from __future__ import annotations

from pyworker.config.variables.row import Reader, Variable

WORKER_VARIABLES: tuple[Variable, ...] = (
    # --- set by the platform (Vast.ai) ---------------------------------------------------------
    Variable(
        "CONTAINER_ID",
        "unset (local mode when `REPORT_ADDR` is unset too)",
        "The worker's id, sent as `id` in every report. Setting it (or `REPORT_ADDR`) leaves "
        "local mode.",
        Reader.PLATFORM,
    ),
    Variable(
        "REPORT_ADDR",
        "unset: local mode; `https://run.vast.ai` when only `CONTAINER_ID` is set",
        "Autoscaler base URLs, comma-separated. Reports go to the first that accepts them; the "
        "first also serves the public key (`GET /pubkey/`).",
        Reader.PLATFORM,
    ),
    Variable(
        "MASTER_TOKEN",
        "unset",
        "The worker's secret: sent as `mtoken` in reports; the bearer token of "
        "`/pyworker/update` and of the details of `/status`, `/ready` and `/metrics` "
        "(docs/security.md). Unset: updates are refused and the details are served to nobody "
        "(to everyone in local mode).",
        Reader.PLATFORM,
    ),
    Variable(
        "WORKER_PORT",
        "`3000`",
        "The port the worker listens on (`pyworker run --port` overrides it; 0: any free port).",
        Reader.PLATFORM,
    ),
    Variable(
        "PUBLIC_IPADDR",
        "the listen address (`127.0.0.1` for `0.0.0.0`)",
        "The public address in the worker's `url` (what the autoscaler hands to clients).",
        Reader.PLATFORM,
    ),
    Variable(
        "VAST_TCP_PORT_<WORKER_PORT>",
        "`WORKER_PORT`",
        "The public port mapped to `WORKER_PORT` (e.g. `VAST_TCP_PORT_3000`), in the worker's "
        "`url`.",
        Reader.PLATFORM,
    ),
    Variable(
        "USE_SSL",
        "`false`",
        "`true`: serve TLS with `TLS_CERT_FILE` and `TLS_KEY_FILE`, and report an `https` url.",
        Reader.PLATFORM,
    ),
    Variable(
        "UNSECURED",
        "`true` in local mode, else `false`",
        "`true`: check no `auth_data` signature. `false` needs `REPORT_ADDR` (the key comes "
        "from it).",
        Reader.PLATFORM,
    ),
    # --- pyworker's own ------------------------------------------------------------------------
    Variable(
        "WORKER_HOST",
        "`127.0.0.1` in local mode, else `0.0.0.0`",
        "The address the worker listens on (`pyworker run --host` overrides it).",
        Reader.WORKER,
    ),
    Variable(
        "WORKER_HTTP_PORT",
        "`WORKER_PORT + 1` (0 when `WORKER_PORT` is 0)",
        "The plain-HTTP side port that serves `/session/end` only.",
        Reader.WORKER,
    ),
    Variable(
        "WORKER_HTTP_HOST",
        "`127.0.0.1`",
        "The address of the side port: loopback unless told otherwise.",
        Reader.WORKER,
    ),
    Variable(
        "TLS_CERT_FILE", "`/etc/instance.crt`", "The certificate for `USE_SSL`.", Reader.WORKER
    ),
    Variable(
        "TLS_KEY_FILE", "`/etc/instance.key`", "The private key for `USE_SSL`.", Reader.WORKER
    ),
    Variable(
        "PYWORKER_STRICT_AUTH",
        "`false`",
        "`true`: verify strict signatures, each `auth_data` once (docs/security.md). Needs "
        "`REPORT_ADDR`; contradicts `UNSECURED=true`.",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_GRACE",
        "`30`",
        "Seconds the requests in flight get to finish after SIGTERM or SIGHUP (the start script "
        "also waits this long before SIGKILL). 0: none.",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_BODY_TIMEOUT",
        "`60`",
        "Seconds a client may take to send a request body before 408 (above 0; no unlimited).",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_KEEPALIVE_TIMEOUT",
        "`75`",
        "Seconds an idle connection, or one still sending its headers, is kept (above 0).",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_REPORT_INTERVAL",
        "`1`",
        "Seconds between reports to the autoscaler while something changes (above 0).",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_UPDATE_MARKER",
        "`/.force_update`",
        "The file `/pyworker/update` writes; the start script reinstalls when it exists.",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_CACHE_DIR",
        "`~/.cache/pyworker`",
        "The folder of the benchmark cache (`benchmark.json`) unless `benchmark.cache_file` "
        "names a file.",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_LOG_LEVEL",
        "`INFO`",
        "The log level (`DEBUG`, `INFO`, `WARNING`...; `pyworker run --log-level` overrides it). "
        "No payload, signature or token is logged at `INFO`.",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_WORKERS_DIR",
        "unset",
        "A folder searched first for `pyworker run <name>` (then `./workers`, then pyworker's "
        "own `pyworker/workers/`).",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_LOAD_TIMEOUT",
        "`7200` (seconds)",
        "How long a first start may wait for the model's load signal (its loaded log line or "
        "a healthy health route) before the worker reports itself errored, saying it never "
        "loaded; it recovers if the model loads later. 0: no deadline (docs/load-deadline.md).",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_RELOAD_TIMEOUT",
        "`1800` (seconds)",
        "The same deadline for a restart on a machine where this model already loaded (the "
        "benchmark cache knows). 0: no deadline.",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_ERROR_FILE",
        "unset",
        "A file pyworker writes why it stopped to (at most 2000 characters) when it exits on an "
        "error; `scripts/on_start.sh` sets it and puts the text in its `error_msg` report.",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_SIGN_CERT_URL",
        "`https://console.vast.ai/api/v0/sign_cert/`",
        "Where `python -m pyworker.startup.certificate` posts the CSR to get `/etc/instance.crt` "
        "signed "
        "(`?instance_id=$CONTAINER_ID` is added).",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_SIGN_ATTEMPTS",
        "`6`",
        "Signing attempts before the certificate step gives up and reports `error_msg`.",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_SIGN_BACKOFF",
        "`2` (seconds)",
        "The first wait between signing attempts; it doubles after each failure.",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_VERIFY_URL",
        "`true`",
        "Refuse (401) an `auth_data` whose `url` does not name this worker's scheme, host and "
        "port (the public URL it reports). `false` for a proxy that rewrites the address "
        "(docs/signature-binding.md).",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_MAX_CONNECTIONS",
        "from the descriptor limit (raised to the hard limit at start), with a reserve",
        "A lower cap on open client connections; beyond it the oldest idle one is closed, or "
        "503 when all are busy (docs/resources.md).",
        Reader.WORKER,
    ),
    Variable(
        "PYWORKER_MAX_UNVERIFIED_BYTES",
        "`67108864` (64 MiB), or twice `max_body_size` when larger",
        "Bytes of request bodies held, across all clients, before their signature is checked; "
        "503 with `Retry-After` beyond.",
        Reader.WORKER,
    ),
    # --- config overrides (pyworker.config.loader.ENV_OVERRIDES) -------------------------------
    Variable(
        "MODEL_SERVER_URL",
        "the config's value",
        "Overrides `model_server.base_url`.",
        Reader.CONFIG,
    ),
    Variable(
        "MODEL_LOG",
        "the config's value (the start script: `/var/log/model/server.log`)",
        "Overrides `model_server.log_file`. The start script writes the model server's output "
        "there and keeps the previous log as `$MODEL_LOG.old`.",
        Reader.CONFIG,
    ),
    Variable(
        "MODEL_HEALTH_ENDPOINT",
        "the config's value",
        "Overrides `model_server.health_path`.",
        Reader.CONFIG,
    ),
)
