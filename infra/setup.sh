#!/usr/bin/env bash
# Idempotent setup of a Debian 12 machine that has only Python 3.11: the project's virtual
# environment (.venv) and, with --system, the Debian packages the local services need
# (Slurm 22.05 with accounting via slurmdbd + MariaDB, munge).
#
# Usage: infra/setup.sh [--system] [--force]
#   --system  also install the Debian packages (needs root; runs apt-get update first)
#   --force   reinstall the Python packages even if nothing changed since the last run
# Environment: PYTHON (interpreter for a new venv, default python3.11 then python3),
#              DINOV2_VENV (default <repo>/.venv).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SYSTEM_PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server mariadb-client procps)
OFFICIAL_DINOV2="dinov2==0.0.1.dev2"

with_system=0
force=0
for arg in "$@"; do
    case "$arg" in
        --system) with_system=1 ;;
        --force) force=1 ;;
        -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg' (allowed: --system, --force)" ;;
    esac
done

timed() {
    local what="$1" start=$SECONDS
    shift
    "$@"
    log "$what took $((SECONDS - start)) s"
}

packages_missing() {
    local pkg
    for pkg in "${SYSTEM_PACKAGES[@]}"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]]; then
            echo "$pkg"
        fi
    done
}

install_system_packages() {
    local missing
    missing="$(packages_missing)"
    if [[ -z "$missing" ]]; then
        log "system packages already installed: ${SYSTEM_PACKAGES[*]}"
        return 0
    fi
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "installing system packages needs root (or sudo)"
        sudo=(sudo)
    fi
    # There is no init system here: keep the maintainer scripts from starting daemons; the
    # infra/*/up.sh scripts start them with private configuration instead.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${sudo[@]}" chmod 0755 /usr/sbin/policy-rc.d
        # Removed again however this script ends, so the machine's own services are not affected later.
        trap "${sudo[*]} rm -f /usr/sbin/policy-rc.d" EXIT
    fi
    log "installing: $(echo $missing)"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${SYSTEM_PACKAGES[@]}" >/dev/null
}

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3; do
        [[ -n "$candidate" ]] || continue
        if command -v "$candidate" >/dev/null &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    die "no Python >= 3.10 found (set PYTHON=/path/to/python3.11)"
}

# The stamp records what the venv was installed from, so a second run with unchanged inputs is instant.
python_stamp() {
    cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/requirements/constraints.txt" "${BASH_SOURCE[0]}" |
        sha256sum | cut -d' ' -f1
}

install_python_packages() {
    if [[ ! -x "$VENV_BIN/python" ]]; then
        local python
        python="$(find_python)"
        log "creating virtual environment $VENV with $python"
        "$python" -m venv "$VENV"
    fi
    local stamp_file="$VENV/.dinov2-setup-stamp" stamp
    stamp="$(python_stamp)"
    if ((!force)) && [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
        log "python packages up to date (stamp $stamp_file; --force reinstalls)"
        return 0
    fi
    # torch/torchvision resolve from the machine's pip configuration (local wheels) via the pins in
    # pyproject.toml; constraints.txt pins everything else to a set that is known to work together.
    # pip warns once per package that this machine's local index has no folder for it: noise.
    (cd "$REPO_ROOT" && "$VENV_BIN/python" -m pip install -q -c requirements/constraints.txt -e ".[test]" 2>&1) |
        { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
    # The official dinov2 package (below) declares torch 2.0 and CUDA-only requirements on purpose.
    local conflicts
    conflicts="$("$VENV_BIN/python" -m pip check 2>&1 | grep -v -e '^dinov2 ' -e '^No broken' || true)"
    [[ -z "$conflicts" ]] || log "warning: pip check reports conflicts:"$'\n'"$conflicts"
    # The official code, only for parity tests, hence --no-deps.
    "$VENV_BIN/python" -m pip install -q --no-deps "$OFFICIAL_DINOV2" 2>&1 |
        { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
    echo "$stamp" >"$stamp_file"
}

total_start=$SECONDS
if ((with_system)); then
    timed "system packages" install_system_packages
fi
timed "python packages" install_python_packages
log "setup done in $((SECONDS - total_start)) s"
