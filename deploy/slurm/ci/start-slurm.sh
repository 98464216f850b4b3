#!/usr/bin/env bash
# Bring up a single-node Slurm (munged + slurmctld + slurmd) on this machine, for deepfield's CI.
#
#   deploy/slurm/ci/start-slurm.sh            # install if needed, write the config, start, wait until idle
#   eval "$(deploy/slurm/ci/start-slurm.sh --env)"   # same, then export SLURM_CONF for the clients
#
# Needs root and Debian's slurm-wlm and munge packages (installed with apt-get when missing). The
# configuration is deploy/slurm/ci/slurm.conf.in filled in for this host (name, CPUs, memory) and
# written with all daemon state under $DEEPFIELD_SLURM_STATE (default /var/tmp/deepfield-slurm).
# Idempotent: daemons already running with the same configuration are kept; a changed configuration
# restarts them (only the ones whose pid files this script wrote). A slurmctld it starts recovers no jobs from
# an earlier run's saved state, and jobs still queued on daemons it finds running are cancelled: the CI's
# tests are the only users of this Slurm.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
state="${DEEPFIELD_SLURM_STATE:-/var/tmp/deepfield-slurm}"
print_env=0
[[ "${1:-}" == "--env" ]] && print_env=1
log() { echo "start-slurm: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (it starts munged, slurmctld and slurmd)"; exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq slurm-wlm munge >&2
fi

# --- munge: the authentication Slurm uses between its daemons and clients
if ! (munge -n | unmunge) >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.2; done
    (munge -n | unmunge) >/dev/null 2>&1 || { log "munged did not start"; exit 1; }
    log "munged started"
fi

# --- the configuration for this host
host="$(hostname -s)"
cpus="$(nproc)"
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p "$state/ctld" "$state/spool"
conf="$state/slurm.conf"
sed -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEM_MB@|$mem_mb|g" -e "s|@STATE@|$state|g" \
    -e "s|@CTLD_PORT@|${DEEPFIELD_SLURMCTLD_PORT:-6817}|g" -e "s|@SLURMD_PORT@|${DEEPFIELD_SLURMD_PORT:-6818}|g" \
    "$here/slurm.conf.in" > "$conf.new"
export SLURM_CONF="$conf"

alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_daemon() {  # stop one daemon started by this script, by its pid file
    local pidfile="$state/$1.pid"
    if alive "$pidfile"; then
        local pid; pid="$(cat "$pidfile")"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$pidfile"
}

if ! cmp -s "$conf.new" "$conf"; then
    log "configuration for $host ($cpus CPUs, $mem_mb MB) written to $conf"
    stop_daemon slurmd
    stop_daemon slurmctld
    mv "$conf.new" "$conf"
else
    rm -f "$conf.new"
fi
if ! alive "$state/slurmctld.pid"; then
    # -c: no jobs recovered from the saved state of an earlier run (a CI run killed with a job running left
    # one that Slurm kept "running" on both CPUs, so every later job waited until the tests timed out)
    /usr/sbin/slurmctld -c -f "$conf"
    log "slurmctld started (state cleared)"
fi
if ! alive "$state/slurmd.pid"; then
    /usr/sbin/slurmd -f "$conf"
    log "slurmd started"
fi

# --- wait until the node takes jobs (a node left DOWN or DRAINED by an earlier run is resumed)
ok=0
for _ in $(seq 120); do
    node_state="$(sinfo -h -N -n "$host" -o %T 2>/dev/null || true)"
    case "$node_state" in
        idle*|mixed*|allocated*) ok=1; break ;;
        down*|drain*|fail*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
if [[ $ok -ne 1 ]]; then
    log "node $host not ready (state: ${node_state:-none}); logs in $state/slurmctld.log, $state/slurmd.log"
    exit 1
fi
# jobs still queued from an earlier run on running daemons belong to no one now: cancel them
left="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
if [[ -n "${left// /}" ]]; then
    log "cancelling jobs left by an earlier run: $left"
    # shellcheck disable=SC2086
    scancel $left >/dev/null 2>&1 || true
    for _ in $(seq 60); do [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break; sleep 0.5; done
    node_state="$(sinfo -h -N -n "$host" -o %T 2>/dev/null || true)"
fi
log "Slurm ready: node $host is ${node_state} (SLURM_CONF=$conf)"
[[ $print_env -eq 1 ]] && echo "export SLURM_CONF=$conf"
exit 0
