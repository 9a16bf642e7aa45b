#!/usr/bin/env bash
# Container entrypoint of a pyworker template: start the model server and the worker beside it,
# keep both alive together, and tell the autoscaler why when the worker cannot come up.
#
#   1. choose the worker, and install pyworker into a venv unless it is already there;
#      with USE_SSL=true, make sure the TLS key and certificate are there (`python -m
#      pyworker.startup.certificate`: reused when still good, else a new key signed by Vast);
#   2. rotate the model server's log and start the model server, its output into that log;
#   3. start `pyworker run <worker>`;
#   4. on SIGTERM, SIGINT or SIGHUP, send SIGTERM to both (SIGINT is ignored by the background
#      children of a script, so it is not forwarded as is) and exit with the worker's status;
#      a second SIGTERM or SIGINT kills them now (a SIGHUP never does: it comes when the
#      session the script runs in goes away, often beside a SIGTERM); SIGQUIT, SIGUSR1 and
#      SIGUSR2 are logged and ignored (docs/supervision.md);
#      when either child exits, stop the other and exit with the status of the one that exited.
#      A SIGINT ignored by whoever started the script (`nohup`, a `&` job of a script) stays
#      ignored, as bash must (a non-interactive shell cannot trap a signal ignored on entry):
#      the script says so at start, and SIGTERM, which `docker stop` sends, still stops it.
# Any failure before the worker runs, or a child that exits on its own, is posted as a minimal
# /worker_status/ with error_msg to every REPORT_ADDR entry before the script exits.
# A restarted container (a cold worker starting again) reuses the installed venv and every
# cache; nothing is deleted except the update marker after a successful reinstall.
#
# Environment (all optional except the worker):
#   PYWORKER_WORKER        the worker to run: a workers/ folder name or a config file path
#   BACKEND                the reference worker's name for the same thing; used when
#                          PYWORKER_WORKER is unset
#   MODEL_SERVER_CMD       shell command starting the model server (run with `bash -c`); empty
#                          means the model server is started elsewhere and only the worker runs
#   MODEL_LOG              the model server's log (default /var/log/model/server.log); the last
#                          one is kept as $MODEL_LOG.old; exported to the worker, which follows it
#   PYWORKER_CMD           command that runs pyworker, split on blanks (no quoting); when set it
#                          is used as is and nothing is installed
#   PYWORKER_VENV          venv pyworker is installed into and run from (default
#                          $WORKSPACE/pyworker-venv when WORKSPACE is set, else /opt/pyworker/venv)
#   WORKSPACE              see PYWORKER_VENV
#   PYWORKER_SOURCE        what `pip install` installs pyworker from: a directory, wheel, VCS URL
#                          or requirement (default: the directory above this script)
#   PYWORKER_PIP_ARGS      extra `pip install` arguments, split on blanks (e.g. --no-index
#                          --find-links /wheels)
#   PYWORKER_UPDATE_MARKER file that /pyworker/update writes to ask for a reinstall on the next
#                          start (default /.force_update); removed once the reinstall succeeded
#   PYWORKER_GRACE         seconds a child has to exit after SIGTERM before SIGKILL (default 30)
#   PYWORKER_ERROR_FILE    where pyworker writes why it stopped; its text ends the error_msg of
#                          the report when pyworker exits (default: a fresh temporary file)
#   REPORT_ADDR            comma-separated autoscaler base URLs (default https://run.vast.ai);
#                          with neither REPORT_ADDR nor CONTAINER_ID (local mode) nothing is posted
#   CONTAINER_ID           worker id sent as `id` (default 0)
#   MASTER_TOKEN           worker secret sent as `mtoken`
#   PUBLIC_IPADDR, WORKER_PORT (default 3000), VAST_TCP_PORT_<WORKER_PORT>, USE_SSL
#                          make the `url` of an error report, as the worker itself does
#   USE_SSL                true: serve HTTPS with TLS_CERT_FILE and TLS_KEY_FILE (default
#                          /etc/instance.crt, /etc/instance.key), signed by Vast for CONTAINER_ID
#                          when missing, mismatched or expiring (see pyworker/startup/certificate.py for
#                          PYWORKER_SIGN_CERT_URL, PYWORKER_SIGN_ATTEMPTS, PYWORKER_SIGN_BACKOFF)
#   PYWORKER_PYTHON        the python that runs that step (default the venv's, or python3 when
#                          PYWORKER_CMD is set)
#
# Exit status: 1 when the start failed; else that of the child that exited first, or after a
# signal the worker's.
#
# Needs bash >= 4.4 and python3; setsid (util-linux) is used when present so that a signal
# reaches every process of a child, not just its first one.
set -Eeuo pipefail

SCRIPT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly SCRIPT_ROOT
readonly DEFAULT_VENV="${WORKSPACE:+$WORKSPACE/pyworker-venv}"

MODEL_LOG="${MODEL_LOG:-/var/log/model/server.log}"
export MODEL_LOG
readonly MODEL_SERVER_CMD="${MODEL_SERVER_CMD:-}"
readonly WORKER="${PYWORKER_WORKER:-${BACKEND:-}}"
readonly VENV="${PYWORKER_VENV:-${DEFAULT_VENV:-/opt/pyworker/venv}}"
readonly SOURCE="${PYWORKER_SOURCE:-$SCRIPT_ROOT}"
readonly UPDATE_MARKER="${PYWORKER_UPDATE_MARKER:-/.force_update}"
readonly GRACE="${PYWORKER_GRACE:-30}"
readonly REPORT_TAIL_LINES=5
readonly REPORT_ERROR_BYTES=2000

model_pid=""
worker_pid=""
caught_signal=""
urgent_signal=""
child_status=0
worker_command=()
worker_error_file=""

log() {
    printf '%s on_start: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

# Post a /worker_status/ report with error_msg to every REPORT_ADDR entry. It is built and sent
# by pyworker/protocol/messages.py, the one definition of the message, which uses the standard
# library only and is run by file path: it works before pyworker is installed, with any python3.
report_error() {
    if [[ -z ${REPORT_ADDR:-} && -z ${CONTAINER_ID:-} ]]; then
        return 0 # local mode, as the worker's: no autoscaler to tell
    fi
    if ! command -v python3 >/dev/null; then
        log "python3 is missing: cannot report the error to the autoscaler"
        return 1
    fi
    python3 -I "$SCRIPT_ROOT/pyworker/protocol/messages.py" "$1"
}

# Log, report and exit: the one way out of a failed start.
fail() {
    trap - ERR
    log "error: $1"
    report_error "$1" || true
    stop_children TERM
    exit 1
}

# shellcheck disable=SC2329 # called from a trap
on_unexpected_error() {
    local status=$? line=$1 command=$2
    fail "start script failed (status $status) at line $line: $command"
}

# The last lines of a file, for an error message.
tail_of() {
    if [[ -r $1 ]]; then
        tail -n "$REPORT_TAIL_LINES" -- "$1" 2>/dev/null || true
    fi
}

pyworker_installed() {
    # -I: the current directory (a checkout of pyworker, say) must not count as installed
    [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -I -c 'import pyworker' 2>/dev/null
}

install_pyworker() {
    local pip_args=() output
    read -r -a pip_args <<<"${PYWORKER_PIP_ARGS:-}"
    output="$(mktemp)"
    log "installing pyworker from $SOURCE into $VENV"
    if [[ ! -x $VENV/bin/python ]] && ! python3 -m venv "$VENV" >"$output" 2>&1; then
        fail "cannot create the venv $VENV: $(tail_of "$output")"
    fi
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade \
        "${pip_args[@]}" "$SOURCE" 2>&1 | tee "$output"; then
        fail "pip could not install pyworker from $SOURCE: $(tail_of "$output")"
    fi
    rm -f -- "$output"
    if [[ -e $UPDATE_MARKER ]]; then
        rm -f -- "$UPDATE_MARKER" || log "warning: cannot remove $UPDATE_MARKER"
    fi
}

# Sets worker_command: PYWORKER_CMD as given, else the venv's pyworker, installed when missing
# or when an update was asked for.
choose_pyworker() {
    if [[ -n ${PYWORKER_CMD:-} ]]; then
        read -r -a worker_command <<<"$PYWORKER_CMD"
        if ((${#worker_command[@]} == 0)); then
            fail "PYWORKER_CMD holds no command"
        fi
    else
        if [[ -e $UPDATE_MARKER ]]; then
            log "update asked for ($UPDATE_MARKER): reinstalling pyworker"
            install_pyworker
        elif pyworker_installed; then
            log "pyworker already installed in $VENV"
        else
            install_pyworker
        fi
        worker_command=("$VENV/bin/pyworker")
    fi
    if ! command -v "${worker_command[0]}" >/dev/null; then
        fail "pyworker command not found: ${worker_command[0]}"
    fi
}

use_ssl() {
    case "${USE_SSL:-}" in
    [Tt][Rr][Uu][Ee] | 1 | [Yy][Ee][Ss] | [Oo][Nn]) return 0 ;;
    *) return 1 ;;
    esac
}

# USE_SSL=true: reuse the certificate, or get a new one signed. The module retries a failed
# signing itself (bounded, each failure reported); when it gives up, the start fails.
prepare_certificate() {
    local python output
    use_ssl || return 0
    python="${PYWORKER_PYTHON:-}"
    if [[ -z $python && -n ${PYWORKER_CMD:-} ]]; then
        python=python3
    fi
    python="${python:-$VENV/bin/python}"
    output="$(mktemp)"
    if ! "$python" -m pyworker.startup.certificate 2>&1 | tee "$output" >&2; then
        fail "no TLS certificate: $(tail -n 1 -- "$output" | sed 's/^.*pyworker.startup.certificate: //')"
    fi
    rm -f -- "$output"
}

rotate_model_log() {
    mkdir -p -- "$(dirname -- "$MODEL_LOG")"
    if [[ -e $MODEL_LOG ]]; then
        mv -f -- "$MODEL_LOG" "$MODEL_LOG.old"
    fi
    : >"$MODEL_LOG"
}

# Start a child in its own session when setsid exists, so its process group can be signalled.
spawn() {
    if command -v setsid >/dev/null; then
        setsid "$@" &
    else
        "$@" &
    fi
}

start_model_server() {
    rotate_model_log
    log "starting the model server, output in $MODEL_LOG"
    spawn bash -c "$MODEL_SERVER_CMD" >>"$MODEL_LOG" 2>&1 </dev/null
    model_pid=$!
}

start_worker() {
    log "starting ${worker_command[*]} run $WORKER"
    # pyworker writes why it stopped there, for the report (pyworker/startup/failure.py).
    worker_error_file="${PYWORKER_ERROR_FILE:-$(mktemp 2>/dev/null || true)}"
    if [[ -n $worker_error_file ]]; then
        : >"$worker_error_file" 2>/dev/null || true
        export PYWORKER_ERROR_FILE="$worker_error_file"
    fi
    spawn "${worker_command[@]}" run "$WORKER" </dev/null
    worker_pid=$!
}

is_running() {
    [[ -n $1 ]] && kill -0 "$1" 2>/dev/null
}

# True while any process of the child's group is left (a model server's workers, say).
group_running() {
    [[ -n $1 ]] && { kill -0 -- "-$1" 2>/dev/null || kill -0 "$1" 2>/dev/null; }
}

# Signal a child's whole process group, or the child alone when it has no group of its own.
signal_child() {
    local signal=$1 pid=$2
    [[ -n $pid ]] || return 0
    kill -s "$signal" -- "-$pid" 2>/dev/null || kill -s "$signal" "$pid" 2>/dev/null || true
}

signal_children() {
    signal_child "$1" "$model_pid"
    signal_child "$1" "$worker_pid"
}

# Send $1 (unless empty) to both children, give every process of theirs PYWORKER_GRACE
# seconds to exit, then SIGKILL what is left.
stop_children() {
    local signal=$1 deadline=$((SECONDS + GRACE))
    if [[ -n $signal ]]; then
        signal_children "$signal"
    fi
    while children_left && ((SECONDS < deadline)); do
        sleep 0.1
    done
    if children_left; then
        log "processes still running after ${GRACE}s: killing them"
        signal_children KILL
    fi
}

children_left() {
    group_running "$model_pid" || group_running "$worker_pid"
}

# shellcheck disable=SC2329 # called from a trap
on_signal() {
    if [[ $1 != HUP ]]; then
        if [[ -n $urgent_signal ]]; then
            log "second SIG$1: killing the children now"
            signal_children KILL
            return
        fi
        urgent_signal=$1
    fi
    if [[ -n $caught_signal ]]; then
        log "caught SIG$1: already stopping"
        return
    fi
    caught_signal=$1
    log "caught SIG$1: stopping the model server and the worker"
    signal_children TERM
}

# Set child_status to the exit status of a child that has exited.
collect_status() {
    child_status=0
    if [[ -n $1 ]]; then
        wait "$1" 2>/dev/null || child_status=$?
    fi
}

# Wait until a signal arrives or a child exits, then stop both and exit.
supervise() {
    local status name
    trap 'on_signal TERM' TERM
    trap 'on_signal INT' INT
    trap 'on_signal HUP' HUP
    log "supervising the model server (pid ${model_pid:-none}) and pyworker (pid $worker_pid)"
    while true; do
        status=0
        wait -n || status=$?
        if [[ -n $caught_signal ]]; then
            stop_children ""
            collect_status "$worker_pid"
            log "stopped (worker exit status $child_status)"
            exit "$child_status"
        fi
        if ! is_running "$worker_pid"; then
            name="pyworker"
            break
        fi
        if [[ -n $model_pid ]] && ! is_running "$model_pid"; then
            name="the model server"
            break
        fi
    done
    local message="$name exited with status $status"
    if ((status == 127)); then
        message+=" (command not found)"
    fi
    if [[ $name != pyworker ]]; then
        message+=": $(tail_of "$MODEL_LOG")"
    elif [[ -n $worker_error_file && -s $worker_error_file ]]; then
        message+=": $(head -c "$REPORT_ERROR_BYTES" -- "$worker_error_file" 2>/dev/null || true)"
    fi
    log "$message; stopping the other child"
    stop_children TERM
    report_error "$message" || true
    exit "$status"
}

# A signal before supervise() stops whatever was started and exits.
# shellcheck disable=SC2329 # called from a trap
on_startup_signal() {
    log "caught SIG$1 during start-up: stopping"
    stop_children TERM
    exit "$2"
}

# bash keeps a signal ignored on entry ignored, traps or not: say so rather than seem deaf.
warn_if_sigint_ignored() {
    if [[ $(trap -p INT) == "trap -- '' SIGINT" ]]; then
        log "SIGINT was ignored when this script started (nohup, a background job):" \
            "it stays ignored; stop the worker with SIGTERM"
    fi
}

check_settings() {
    if [[ -z $WORKER ]]; then
        fail "no worker chosen: set PYWORKER_WORKER (or BACKEND) to a workers/ name or a config file"
    fi
    if [[ ! $GRACE =~ ^[0-9]+$ ]]; then
        fail "PYWORKER_GRACE=$GRACE is not a whole number of seconds"
    fi
}

main() {
    trap 'on_unexpected_error "$LINENO" "$BASH_COMMAND"' ERR
    warn_if_sigint_ignored
    trap 'on_startup_signal TERM 143' TERM
    trap 'on_startup_signal INT 130' INT
    trap 'on_startup_signal HUP 129' HUP
    # Their default actions would end the script and orphan its children; a trap (not an
    # empty one, which children would inherit) leaves the children their own defaults.
    trap 'log "caught SIGQUIT: ignored"' QUIT
    trap 'log "caught SIGUSR1: ignored"' USR1
    trap 'log "caught SIGUSR2: ignored"' USR2
    check_settings
    choose_pyworker
    prepare_certificate
    if [[ -n $MODEL_SERVER_CMD ]]; then
        start_model_server
    else
        log "MODEL_SERVER_CMD is empty: the model server is expected to be started elsewhere"
    fi
    start_worker
    supervise
}

main "$@"
