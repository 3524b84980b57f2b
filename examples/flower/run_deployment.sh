#!/usr/bin/env bash
# FlexLoRA in Flower's deployment mode, on this one machine: a SuperLink and NODES SuperNodes
# as separate processes talking over 127.0.0.1, and the app submitted with `flwr run`, exactly
# as across machines (there: start each SuperNode on its own host with --superlink HOST:PORT).
#
#   bash run_deployment.sh                         # 3 nodes, ranks 2/4/8 (the rank-8 one in bf16)
#   NODES=4 RANKS=2,4,8,16 bash run_deployment.sh -c "num-server-rounds=2"
#   SAVE_DIR=/tmp/rounds bash run_deployment.sh    # keep every round's PEFT adapters
#
# Needs flexlora-cli[flower] and transformers in the current environment (Flower's runtime
# dependency installation is turned off so that the app runs in this environment). Extra
# arguments go to `flwr run`. Everything started here is stopped on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")"

NODES="${NODES:-3}"
RANKS="${RANKS:-2,4,8}"
DTYPES="${DTYPES:-float32,float32,bfloat16}"
TIMEOUT="${TIMEOUT:-600}"  # seconds for the whole run
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/flexlora-flower.XXXXXX")"
export FLWR_HOME="$WORK/flwr-home"  # Flower's config and installed apps: kept out of ~/.flwr
mkdir -p "$FLWR_HOME" "$WORK/logs"
PIDS=()

descendants() {  # the process ids below $1 (Flower starts some children in sessions of their own)
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}

alive() {  # is any of these processes still running (zombies count as gone)?
    local pid state
    for pid in "$@"; do
        state="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
        [ -n "$state" ] && [ "${state#Z}" = "$state" ] && return 0
    done
    return 1
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local all=() pid
    for pid in "${PIDS[@]}"; do all+=("$pid" $(descendants "$pid")); done
    [ "${#all[@]}" -gt 0 ] && kill -TERM "${all[@]}" 2>/dev/null || true
    for _ in $(seq 20); do
        alive "${all[@]}" || break
        sleep 0.5
    done
    [ "${#all[@]}" -gt 0 ] && kill -KILL "${all[@]}" 2>/dev/null || true
    if [ "$status" != 0 ]; then
        echo "Failed (exit $status). Last lines of the logs in $WORK/logs:" >&2
        for log in "$WORK"/logs/*.log; do echo "== $log" >&2; tail -n 15 "$log" >&2; done
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() {  # start NAME COMMAND...: in the background, output to logs/NAME.log
    local name=$1; shift
    "$@" >"$WORK/logs/$name.log" 2>&1 &
    PIDS+=("$!")
}

read -r LINK_PORT NODE_PORTS <<<"$(python - "$NODES" <<'EOF'
import socket, sys
sockets = [socket.socket() for _ in range(1 + int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(sockets[0].getsockname()[1], ",".join(str(s.getsockname()[1]) for s in sockets[1:]))
EOF
)"
IFS=, read -r -a NODE_PORT <<<"$NODE_PORTS"
IFS=, read -r -a RANK <<<"$RANKS"
IFS=, read -r -a DTYPE <<<"$DTYPES"

echo "SuperLink on 127.0.0.1:$LINK_PORT; logs in $WORK/logs"
start superlink flower-superlink --insecure --host 127.0.0.1 --port "$LINK_PORT" \
    --disable-runtime-dependency-installation
python - "$LINK_PORT" <<'EOF'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/health"
for _ in range(120):
    try:
        urllib.request.urlopen(url, timeout=1)
        sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(f"SuperLink did not answer on {url}")
EOF

for ((i = 0; i < NODES; i++)); do
    rank="${RANK[i % ${#RANK[@]}]}"
    dtype="${DTYPE[i % ${#DTYPE[@]}]}"
    echo "SuperNode $i: LoRA rank $rank, $dtype"
    start "supernode-$i" flower-supernode --insecure --superlink "127.0.0.1:$LINK_PORT" \
        --host 127.0.0.1 --port "${NODE_PORT[i]}" \
        --node-config "partition-id=$i num-partitions=$NODES lora-rank=$rank lora-dtype=\"$dtype\""
done

cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "deployment"

[superlink.deployment]
address = "127.0.0.1:$LINK_PORT"
insecure = true
EOF

overrides="min-nodes=$NODES"
if [ -n "${SAVE_DIR:-}" ]; then overrides+=" save-dir=\"$(realpath -m "$SAVE_DIR")\""; fi
timeout "$TIMEOUT" flwr run . deployment --stream -c "$overrides" "$@" | tee "$WORK/logs/flwr-run.log"
grep -q "FlexLoRA finished" "$WORK/logs/flwr-run.log" || { echo "The run did not finish" >&2; exit 1; }
