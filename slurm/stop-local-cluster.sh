#!/usr/bin/env bash
# Stop the one-node cluster started by slurm/start-local-cluster.sh (its slurmd
# and slurmctld; munged is left running for other users). Idempotent.
set -euo pipefail
DIR=${MIXBENCH_SLURM_DIR:-/tmp/mixbench-slurm}
CONF=$DIR/slurm.conf
for daemon in slurmd slurmctld; do
    pidfile=$DIR/$daemon.pid
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$pidfile"
done
# Remove the /etc/slurm/slurm.conf link only if it points at our file.
if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
    rm -f /etc/slurm/slurm.conf
fi
echo "stop-local-cluster: stopped"
