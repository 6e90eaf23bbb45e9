#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head plus N worker nodes, each `ray start` with its
# own slice of the machine (CPUs, object store, a custom resource), so that scheduling across
# nodes, spilling and Ray Data shuffles behave as on a real cluster.
#
#   cluster/local-multinode.sh start [--workers 2] [--head-cpus 1] [--worker-cpus 1]
#   eval "$(cluster/local-multinode.sh env)"        # RAY_ADDRESS + the auth variables
#   ray job submit --working-dir . -- python jobs/smoke.py --out /tmp/smoke.json
#   cluster/local-multinode.sh status
#   cluster/local-multinode.sh stop
#
# Token authentication (Ray 2.60): a new local cluster turns it on by itself (`ray.init()`), and
# `ray start --head` turns it on whenever ~/.ray/auth_token exists, but a client turns it on only
# when RAY_AUTH_MODE=token is in its environment; without that `ray job submit` fails with
# "Missing authentication token". So this script decides for every process: RAY_AUTH_MODE=token
# (the default) with a fresh token in $RAGGEN_RAY_DIR/auth_token passed as RAY_AUTH_TOKEN_PATH to
# each node, and the same two variables printed by `env` for clients. RAY_AUTH_MODE=disabled in
# the caller's environment opts out (anyone who reaches the ports can then run code).
#
# A node counts as up once its `ray start --block` prints that it will block (the node whole, its
# dashboard agent included), not when the GCS first lists it; a node that exits while starting (under
# load a raylet gives up waiting for its agent) is started again on fresh ports, up to 3 times.
#
# The nodes run $RAY_BIN (default: the repo's .venv/bin/ray), so workers and job drivers use that
# venv's python; its bin/ leads PATH, so a job's `python` is that venv's too.
# `stop` ends only the processes this script started (never `ray stop`, which would kill every
# Ray cluster on the machine, other users' included).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${RAGGEN_RAY_DIR:-/tmp/raggen-ray}"     # short: Ray's unix sockets live under it
RAY_BIN="${RAY_BIN:-$REPO/.venv/bin/ray}"
PYTHON="$(dirname "$RAY_BIN")/python"
AUTH_MODE="${RAY_AUTH_MODE:-token}"   # at start; later commands read it back from $STATE
WORKERS=2
HEAD_CPUS=1
WORKER_CPUS=1
OBJECT_STORE_BYTES=$((300 * 1024 * 1024))
TIMEOUT_S=90
ATTEMPTS=3   # starts of one node before giving up (see start_node)
STARTED_LINE="This command will now block forever"  # `ray start --block` prints it once its node is up

die() { echo "local-multinode: $*" >&2; exit 1; }

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

free_ports() {  # free_ports N -> N distinct free TCP ports on 127.0.0.1
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

node_env() {  # the environment every node and client of this cluster shares
  export RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
  # On SIGTERM a node first drains for up to 30 s (for Serve on Kubernetes); here, stop at once.
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
  export PATH="$(dirname "$RAY_BIN"):$PATH"
  export RAY_AUTH_MODE="$AUTH_MODE"
  if [[ "$AUTH_MODE" == token ]]; then
    export RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
  else
    unset RAY_AUTH_TOKEN_PATH RAY_AUTH_TOKEN
  fi
}

launch() {  # launch NAME ray-start-args... : a `ray start --block` in its own session
  local name="$1"; shift
  setsid "$RAY_BIN" start --block --disable-usage-stats "$@" >"$STATE/logs/$name.out" 2>&1 &
  echo "$! $name" >>"$STATE/pids"
}

alive_nodes() {
  "$PYTHON" - "$(cat "$STATE/gcs_address")" <<'EOF' 2>/dev/null || echo 0
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
EOF
}

wait_started() {  # wait_started NAME: 0 once the node's `ray start` printed STARTED_LINE, 1 if it exited first
  # Its GCS or job API can answer before the node is whole: under load a raylet gives up on its
  # dashboard agent (15 s per port file in Ray 2.60) and the node dies after clients saw it.
  local name="$1" pid deadline=$((SECONDS + TIMEOUT_S))
  pid="$(node_pid "$name")"
  while ((SECONDS < deadline)); do
    grep -q "$STARTED_LINE" "$STATE/logs/$name.out" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 1
  done
  die "$name not up within ${TIMEOUT_S}s (logs: $STATE/logs)"
}

node_pid() { awk -v n="$1" '$2 == n {p = $1} END {print p}' "$STATE/pids"; }

forget_node() {  # forget_node NAME: stop what is left of its session, drop it from the pid list
  local name="$1" pid
  pid="$(node_pid "$name")"
  [[ -n "$pid" ]] && stop_node "$pid" "$name"
  awk -v n="$name" '$2 != n' "$STATE/pids" >"$STATE/pids.tmp" && mv "$STATE/pids.tmp" "$STATE/pids"
}

start_node() {  # start_node NAME LAUNCHER: run LAUNCHER (NAME on fresh ports) until the node is up
  local name="$1" launcher="$2" attempt
  for attempt in $(seq 1 "$ATTEMPTS"); do
    "$launcher"
    wait_started "$name" && return 0
    echo "local-multinode: $name exited while starting (attempt $attempt of $ATTEMPTS):" >&2
    tail -n 20 "$STATE/logs/$name.out" >&2
    mv "$STATE/logs/$name.out" "$STATE/logs/$name.attempt-$attempt.out"
    forget_node "$name"
  done
  die "$name did not start in $ATTEMPTS attempts (logs: $STATE/logs)"
}

wait_for_nodes() {  # wait_for_nodes N: the GCS counts N live nodes
  local deadline=$((SECONDS + TIMEOUT_S)) n=0
  while ((SECONDS < deadline)); do
    n="$(alive_nodes | tail -n1)"
    ((n >= $1)) && return 0
    sleep 2
  done
  die "only $n of $1 nodes came up within ${TIMEOUT_S}s (logs: $STATE/logs)"
}

launch_head() {
  local gcs dash client agent
  read -r gcs dash client agent <<<"$(free_ports 4)"
  launch head --head --port="$gcs" --dashboard-port="$dash" --include-dashboard=true \
    --dashboard-host=127.0.0.1 --ray-client-server-port="$client" --dashboard-agent-listen-port="$agent" \
    --num-cpus="$HEAD_CPUS" --num-gpus=0 --object-store-memory="$OBJECT_STORE_BYTES" \
    --temp-dir="$STATE/tmp"
  echo "127.0.0.1:$gcs" >"$STATE/gcs_address"
  echo "http://127.0.0.1:$dash" >"$STATE/dashboard_address"
}

launch_worker() {  # worker number $WORKER, joining the head in $STATE/gcs_address
  local agent
  read -r agent <<<"$(free_ports 1)"
  launch "worker-$WORKER" --address="$(cat "$STATE/gcs_address")" --num-cpus="$WORKER_CPUS" --num-gpus=0 \
    --object-store-memory="$OBJECT_STORE_BYTES" --dashboard-agent-listen-port="$agent" \
    --resources="{\"raggen_worker\": 1, \"worker_$WORKER\": 1}"
}

cmd_start() {
  while (($#)); do
    case "$1" in
      --workers) WORKERS="$2"; shift 2 ;;
      --head-cpus) HEAD_CPUS="$2"; shift 2 ;;
      --worker-cpus) WORKER_CPUS="$2"; shift 2 ;;
      -h|--help) usage ;;
      *) die "unknown option $1 (see --help)" ;;
    esac
  done
  [[ -x "$RAY_BIN" ]] || die "no ray at $RAY_BIN (make venv, or set RAY_BIN)"
  [[ "$WORKERS" =~ ^[0-9]+$ ]] || die "--workers must be a whole number, got $WORKERS"
  [[ "$AUTH_MODE" == token || "$AUTH_MODE" == disabled ]] || die "RAY_AUTH_MODE must be token or disabled"
  if [[ -s "$STATE/pids" ]]; then
    while read -r pid _; do
      kill -0 "$pid" 2>/dev/null && die "a cluster is already running from $STATE (stop it first)"
    done <"$STATE/pids"
  fi
  rm -rf "$STATE"; mkdir -p "$STATE/logs" "$STATE/tmp"; : >"$STATE/pids"
  echo "$AUTH_MODE" >"$STATE/auth_mode"
  if [[ "$AUTH_MODE" == token ]]; then
    (umask 077; "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$STATE/auth_token")
  fi
  node_env
  trap 'echo "local-multinode: start failed, stopping what started" >&2; cmd_stop' EXIT
  cd "$REPO"  # a job submitted without --working-dir runs in the head's working directory
  start_node head launch_head
  wait_for_nodes 1
  # One at a time: nodes on one machine share the session's socket folder, and two raylets
  # starting together pick the same socket name (raylet.1) and one dies with "address in use".
  for WORKER in $(seq 1 "$WORKERS"); do
    start_node "worker-$WORKER" launch_worker
    wait_for_nodes $((WORKER + 1))
  done
  trap - EXIT
  echo "local-multinode: head + $WORKERS workers up (auth: $AUTH_MODE)"
  echo "  dashboard/jobs: $(cat "$STATE/dashboard_address")   ray.init address: $(cat "$STATE/gcs_address")"
  echo "  eval \"\$($0 env)\"; ray job submit -- python jobs/smoke.py --out /tmp/smoke.json"
}

saved_auth_mode() { [[ -s "$STATE/auth_mode" ]] && AUTH_MODE="$(cat "$STATE/auth_mode")"; return 0; }

cmd_env() {
  [[ -s "$STATE/dashboard_address" ]] || die "no cluster state in $STATE (start one first)"
  saved_auth_mode
  echo "export RAY_ADDRESS=$(cat "$STATE/dashboard_address")"
  echo "export RAY_AUTH_MODE=$AUTH_MODE"
  if [[ "$AUTH_MODE" == token ]]; then
    echo "export RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
  else
    echo "unset RAY_AUTH_TOKEN_PATH RAY_AUTH_TOKEN"
  fi
}

cmd_status() {
  [[ -s "$STATE/pids" ]] || { echo "local-multinode: no cluster started from $STATE"; return 0; }
  while read -r pid name; do
    if kill -0 "$pid" 2>/dev/null; then echo "$name: running (pid $pid)"; else echo "$name: gone"; fi
  done <"$STATE/pids"
  saved_auth_mode
  node_env
  "$RAY_BIN" status --address "$(cat "$STATE/gcs_address")" || true
}

session_pids() {  # the processes in the session a `setsid ray start` made (sid = its pid)
  ps -eo pid=,sid= | awk -v s="$1" '$2 == s {print $1}'
}

stop_node() {  # stop_node PID NAME: SIGTERM, wait for its session to empty, else SIGKILL it
  local pid="$1" name="$2" deadline=$((SECONDS + 20)) rest
  kill -TERM "$pid" 2>/dev/null || true
  while ((SECONDS < deadline)); do
    [[ -z "$(session_pids "$pid")" ]] && return 0
    sleep 1
  done
  rest="$(session_pids "$pid")"
  echo "local-multinode: $name did not stop in 20s, killing pids" $rest >&2
  kill -KILL $rest 2>/dev/null || true
}

cmd_stop() {
  [[ -s "$STATE/pids" ]] || { echo "local-multinode: nothing to stop in $STATE"; return 0; }
  # One node at a time, workers first, each `ray start --block` alone: its shutdown hook stops
  # its node's processes in order (signalling every process at once can leave one hanging).
  tac "$STATE/pids" | while read -r pid name; do stop_node "$pid" "$name"; done
  : >"$STATE/pids"
  echo "local-multinode: stopped"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  -h|--help|help) usage ;;
  *) usage 2 ;;
esac
