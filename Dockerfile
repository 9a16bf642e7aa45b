# pyworker on a slim Python: the worker (its ready workers are pyworker/workers) and the start
# script, nothing else. The root workers/ (entry points for Vast's start path) is not needed.
# Templates either run it beside a model server started elsewhere, or build FROM it and set
# MODEL_SERVER_CMD; scripts/on_start.sh documents every environment variable.
#
#   docker build -t pyworker .
#   docker run -e PYWORKER_WORKER=<worker> -e MODEL_SERVER_CMD='...' -p 127.0.0.1:3000:3000 pyworker
#
# Without CONTAINER_ID or REPORT_ADDR the worker is in local mode: it checks no signature, so
# publish its port on the host's loopback only (127.0.0.1:3000:3000), as above. Inside the
# container it listens on every interface (WORKER_HOST=0.0.0.0 below), since `-p` forwards to
# the container's interface and not to its loopback. docs/container.md says more.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYWORKER_VENV=/opt/pyworker/venv \
    PYWORKER_SOURCE=/opt/pyworker/src \
    PYWORKER_UPDATE_MARKER=/opt/pyworker/lifecycle/state/force_update \
    MODEL_LOG=/var/log/model/server.log \
    WORKER_PORT=3000 \
    WORKER_HOST=0.0.0.0 \
    PATH=/opt/pyworker/venv/bin:$PATH

# The image runs as the unprivileged user pyworker (uid 10001): serving, following a log and
# reporting need no root. What root would give is prepared here instead:
#  - the venv, the source and the state folder belong to pyworker, so that /pyworker/update can
#    reinstall on the next start; the update marker (PYWORKER_UPDATE_MARKER, read by both the
#    worker and on_start.sh) lives in the state folder, as a plain user cannot write /.force_update;
#  - the model log folder and /workspace (working directory, benchmark cache) are writable.
# TLS (USE_SSL=true) reads /etc/instance.crt and /etc/instance.key. Where the host mounts the key
# readable by root only, either mount a copy readable by uid 10001 and point TLS_KEY_FILE at it,
# or run the container as root (`docker run --user root`, `-u root` in a template's docker
# options): without the key the worker cannot serve TLS.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/pyworker pyworker \
    && mkdir -p /opt/pyworker/src /opt/pyworker/state /var/log/model /workspace \
    && chown -R pyworker:pyworker /opt/pyworker /var/log/model /workspace

COPY --chown=pyworker:pyworker pyproject.toml README.md /opt/pyworker/src/
COPY --chown=pyworker:pyworker pyworker/ /opt/pyworker/src/pyworker/
COPY --chown=pyworker:pyworker scripts/ /opt/pyworker/src/scripts/

USER 10001:10001
RUN python -m venv /opt/pyworker/venv \
    && /opt/pyworker/venv/bin/pip install --no-cache-dir /opt/pyworker/src

WORKDIR /workspace
EXPOSE 3000

# /health answers while the worker serves, loading or not; https when the worker serves TLS
# (its certificate names the public address, so it is not verified on loopback).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as r; tls = os.environ.get('USE_SSL', '').lower() in ('1', 'true', 'yes', 'on'); c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; r.urlopen(('https' if tls else 'http') + '://127.0.0.1:' + os.environ.get('WORKER_PORT', '3000') + '/health', timeout=4, context=c)"]

ENTRYPOINT ["/opt/pyworker/src/scripts/on_start.sh"]
