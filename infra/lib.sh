# Shared helpers for the infra/ scripts: paths, logging, process and port management, env files.
#
# Sourced, never executed. Every service keeps its state, logs and pid files under
# "$INFRA_STATE/<service>/" and publishes the variables clients need in "$INFRA_STATE/env.d/<service>.sh";
# "$INFRA_STATE/env.sh" sources all of those fragments, so `source .infra/env.sh` gives a shell
# every running service.

set -euo pipefail

INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$INFRA_DIR/.." && pwd)"
INFRA_STATE="${DINOV2_INFRA_STATE:-$REPO_ROOT/.infra}"
VENV="${DINOV2_VENV:-$REPO_ROOT/.venv}"
VENV_BIN="$VENV/bin"

# Interpreter for the small helpers below (port probing, HTTP health checks): any Python 3 will do.
if [[ -x "$VENV_BIN/python" ]]; then
    HELPER_PYTHON="$VENV_BIN/python"
else
    HELPER_PYTHON="$(command -v python3 || command -v python3.11 || echo python3)"
fi

log() { printf '[infra %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# A process counts as running only if it exists and is not a zombie: PID 1 on these machines reaps
# orphans slowly, so `kill -0` alone reports dead daemons as alive.
pid_alive() {
    local pid="$1" stat
    [[ -n "$pid" ]] || return 1
    stat="$(ps -o stat= -p "$pid" 2>/dev/null | tr -d ' ')" || return 1
    [[ -n "$stat" && "$stat" != Z* ]]
}

pidfile_alive() {
    local pidfile="$1"
    [[ -s "$pidfile" ]] && pid_alive "$(cat "$pidfile")"
}

# start_daemon NAME PIDFILE LOGFILE CMD...: run CMD in the foreground of a new session (its pid is
# also its process group id), detached from our stdin/stdout/stderr so CI pipes close when the caller
# exits. The pid is written by the process itself just before it execs CMD.
start_daemon() {
    local name="$1" pidfile="$2" logfile="$3"
    shift 3
    mkdir -p "$(dirname "$pidfile")" "$(dirname "$logfile")"
    rm -f "$pidfile"
    log "starting $name (log: $logfile)"
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$logfile" 2>&1 &
    wait_until 10 "$name pid file" test -s "$pidfile"
}

# group_alive PGID: some non-zombie process is still in the process group.
group_alive() {
    ps -o stat= -g "$1" 2>/dev/null | grep -qv '^ *Z'
}

# stop_group NAME PID: SIGTERM the process group PID leads (servers fork workers), wait up to 20 s
# until no live member is left (zombies do not count), then SIGKILL the group.
stop_group() {
    local name="$1" pid="$2" waited=0
    group_alive "$pid" || return 0
    log "stopping $name (process group $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || true
    while group_alive "$pid"; do
        if ((waited >= 200)); then
            log "$name did not exit after SIGTERM; sending SIGKILL"
            kill -KILL -- "-$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

# stop_pidfile NAME PIDFILE: stop the group recorded by start_daemon and forget it.
stop_pidfile() {
    local name="$1" pidfile="$2"
    if [[ -s "$pidfile" ]]; then
        stop_group "$name" "$(cat "$pidfile")"
    fi
    rm -f "$pidfile"
}

# wait_until TIMEOUT_S DESCRIPTION CMD...: poll CMD every 0.25 s.
wait_until() {
    local timeout_s="$1" what="$2" start=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS - start >= timeout_s)); then
            log "timed out after ${timeout_s}s waiting for $what"
            return 1
        fi
        sleep 0.25
    done
}

# A TCP port on 127.0.0.1 nobody listens on: the preferred one if it is free, else one the kernel picks.
free_port() {
    local preferred="$1"
    "$HELPER_PYTHON" - "$preferred" <<'EOF'
import socket, sys
preferred = int(sys.argv[1])
for port in (preferred, 0):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
EOF
}

# http_ok URL: true when GET URL answers 2xx (python, so a bare machine needs no curl).
http_ok() {
    "$HELPER_PYTHON" - "$1" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        sys.exit(0 if 200 <= r.status < 300 else 1)
except Exception:
    sys.exit(1)
EOF
}

require_venv() {
    [[ -x "$VENV_BIN/python" ]] || die "no virtual environment at $VENV: run infra/setup.sh first"
}

# write_env SERVICE NAME=VALUE...: publish client variables for SERVICE and refresh env.sh.
write_env() {
    local service="$1" kv tmp
    shift
    mkdir -p "$INFRA_STATE/env.d"
    tmp="$(mktemp "$INFRA_STATE/env.d/.$service.XXXXXX")"
    {
        echo "# written by infra/$service/up.sh; removed by infra/$service/down.sh"
        for kv in "$@"; do
            printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
        done
    } >"$tmp"
    mv -f "$tmp" "$INFRA_STATE/env.d/$service.sh"
    write_env_index
    log "$service environment (also in $INFRA_STATE/env.sh):"
    sed -n 's/^export /  /p' "$INFRA_STATE/env.d/$service.sh" >&2
}

remove_env() {
    rm -f "$INFRA_STATE/env.d/$1.sh"
    write_env_index
}

write_env_index() {
    mkdir -p "$INFRA_STATE/env.d"
    local tmp
    tmp="$(mktemp "$INFRA_STATE/.env.sh.XXXXXX")"
    cat >"$tmp" <<EOF
# Client environment for the services started by infra/*/up.sh. Usage: source $INFRA_STATE/env.sh
for _dinov2_env in "$INFRA_STATE"/env.d/*.sh; do
    [ -r "\$_dinov2_env" ] && . "\$_dinov2_env"
done
unset _dinov2_env
EOF
    mv -f "$tmp" "$INFRA_STATE/env.sh"
}

# service_port SERVICE DEFAULT: the port SERVICE uses, chosen once (DEFAULT if free) and remembered in
# its state directory so restarts keep the URL clients already have.
service_port() {
    local service="$1" default="$2" file="$INFRA_STATE/$1/port"
    mkdir -p "$INFRA_STATE/$service"
    if [[ ! -s "$file" ]]; then
        free_port "$default" >"$file"
    fi
    cat "$file"
}

# start_http_service SERVICE HEALTH_URL TIMEOUT_S CMD...: start CMD as SERVICE's daemon unless one we
# started is already healthy, then wait for HEALTH_URL to answer 2xx.
start_http_service() {
    local service="$1" health_url="$2" timeout_s="$3"
    shift 3
    local dir="$INFRA_STATE/$service"
    local pidfile="$dir/$service.pid" logfile="$dir/$service.log"
    if pidfile_alive "$pidfile" && http_ok "$health_url"; then
        log "$service already running (pid $(cat "$pidfile"))"
        return 0
    fi
    stop_pidfile "$service" "$pidfile"
    if http_ok "$health_url"; then
        die "something else answers at $health_url; stop it or delete $dir/port to pick another port"
    fi
    start_daemon "$service" "$pidfile" "$logfile" "$@"
    local start=$SECONDS
    until http_ok "$health_url"; do
        if ! pidfile_alive "$pidfile"; then
            tail -n 30 "$logfile" >&2 || true
            die "$service exited during startup; log: $logfile"
        fi
        if ((SECONDS - start >= timeout_s)); then
            tail -n 30 "$logfile" >&2 || true
            die "$service did not answer at $health_url within ${timeout_s}s; log: $logfile"
        fi
        sleep 0.25
    done
    log "$service up in $((SECONDS - start)) s"
}

# stop_http_service SERVICE: stop the daemon start_http_service started and drop its client variables.
stop_http_service() {
    local service="$1"
    stop_pidfile "$service" "$INFRA_STATE/$service/$service.pid"
    remove_env "$service"
    log "$service stopped"
}
