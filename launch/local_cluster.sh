#!/usr/bin/env bash
# A one-machine Ray cluster on loopback, for `launch/submit.sh` and `ray job submit` without a real cluster.
#
# usage: launch/local_cluster.sh start [--num-cpus N] [--num-gpus N] [--object-store-memory BYTES]
#                                      [--port GCS_PORT] [--dashboard-port PORT] [-- extra `ray start` args]
#        launch/local_cluster.sh status
#        launch/local_cluster.sh stop [--all]
#
# start  runs `ray start --head --block` in the background, bound to 127.0.0.1 only, with token
#        authentication (a token is created at ~/.ray/auth_token, or at $RAY_AUTH_TOKEN_PATH, when missing;
#        RAY_AUTH_MODE=disabled turns it off), waits until the dashboard answers and prints what to export.
# status exits 0 when the cluster started here answers, 3 when it is not running.
# stop   stops the cluster started here (by its process id). `stop --all` runs `ray stop`, which ends
#        EVERY Ray process of this machine, including clusters that `ray.init()` or others started.
#
#   GMP_LOCAL_CLUSTER_DIR  state folder: pid, log, env file (default ${TMPDIR:-/tmp}/gmp-dist-local-cluster-$UID)
#   RAY_BIN                the ray executable (default: the repository's .venv, else ray on PATH)
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "local_cluster.sh: error: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${GMP_LOCAL_CLUSTER_DIR:-${TMPDIR:-/tmp}/gmp-dist-local-cluster-$(id -u)}"
PID_FILE="$STATE_DIR/head.pid"
ENV_FILE="$STATE_DIR/env.sh"
LOG_FILE="$STATE_DIR/ray-start.log"

if [[ -n "${RAY_BIN:-}" ]]; then :
elif [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then RAY_BIN="$REPO_ROOT/.venv/bin/ray"
elif command -v ray >/dev/null 2>&1; then RAY_BIN="$(command -v ray)"
else die "the ray command was not found (run make install, or set RAY_BIN)"; fi

head_pid() { [[ -s "$PID_FILE" ]] && cat "$PID_FILE"; }
alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
dashboard_url() { [[ -s "$ENV_FILE" ]] && sed -n 's/^export RAY_ADDRESS=//p' "$ENV_FILE"; }
# The Python that runs ray (pip writes it into the script's #! line), for hosts without curl.
RAY_PY="$(head -n 1 "$RAY_BIN" | sed -n 's/^#!\([^ ]*python[^ ]*\).*/\1/p')"
[[ -x "${RAY_PY:-}" ]] || RAY_PY="$(command -v python3 || echo python3)"
http_ok() {  # URL answers 2xx within 3 s
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 3 "$1" >/dev/null 2>&1
  else
    "$RAY_PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$1" >/dev/null 2>&1
  fi
}
# Up = the dashboard answers its public GCS health check.
answers() { http_ok "$1/api/gcs_healthz"; }

cmd_start() {
  local num_cpus="" num_gpus="" store_bytes="" gcs_port=6379 dashboard_port=8265
  local extra=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --num-cpus) num_cpus="$2"; shift 2 ;;
      --num-gpus) num_gpus="$2"; shift 2 ;;
      --object-store-memory) store_bytes="$2"; shift 2 ;;
      --port) gcs_port="$2"; shift 2 ;;
      --dashboard-port) dashboard_port="$2"; shift 2 ;;
      --) shift; extra=("$@"); break ;;
      *) die "unknown start option $1 (see --help)" ;;
    esac
  done
  local pid; pid="$(head_pid || true)"
  if alive "$pid"; then
    echo "a cluster started here is already running (pid $pid):" >&2
    cat "$ENV_FILE"
    return 0
  fi
  mkdir -p "$STATE_DIR"

  # Token authentication: Ray >= 2.52 turns it on for `ray start` when a token exists, so make one.
  if [[ "${RAY_AUTH_MODE:-token}" != disabled ]]; then
    export RAY_AUTH_MODE=token
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
      (umask 077; mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
       od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$RAY_AUTH_TOKEN_PATH")
    elif [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
      "$RAY_BIN" get-auth-token --generate >/dev/null 2>&1 || die "could not create ~/.ray/auth_token"
    fi
  fi

  local args=(start --head --block --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1
              --port "$gcs_port" --dashboard-port "$dashboard_port" --disable-usage-stats)
  [[ -n "$num_cpus" ]] && args+=(--num-cpus "$num_cpus")
  [[ -n "$num_gpus" ]] && args+=(--num-gpus "$num_gpus")
  [[ -n "$store_bytes" ]] && args+=(--object-store-memory "$store_bytes")
  # Jobs run with this PATH: put the venv's bin first so the entrypoint finds gmp-dist and its python.
  # Ray rewrites --node-ip-address 127.0.0.1 to the machine's outward IP unless told this is a
  # single-machine cluster (ray._private.services.get_node_ip_address): keep every service on loopback.
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PATH="$(dirname "$RAY_BIN"):$PATH" nohup setsid "$RAY_BIN" "${args[@]}" ${extra[@]+"${extra[@]}"} \
    >"$LOG_FILE" 2>&1 </dev/null &
  pid=$!
  echo "$pid" > "$PID_FILE"

  local url="http://127.0.0.1:$dashboard_port"
  local deadline=$((SECONDS + ${GMP_CLUSTER_START_TIMEOUT_S:-120}))
  until answers "$url"; do
    if ! alive "$pid"; then
      rm -f "$PID_FILE"
      echo "ray start failed; the end of $LOG_FILE:" >&2; tail -n 25 "$LOG_FILE" >&2; exit 1
    fi
    if (( SECONDS > deadline )); then
      echo "the dashboard at $url did not answer in time; stopping pid $pid. The end of $LOG_FILE:" >&2
      tail -n 25 "$LOG_FILE" >&2; stop_pid "$pid"; exit 1
    fi
    sleep 1
  done
  {
    echo "export RAY_ADDRESS=$url"
    [[ "${RAY_AUTH_MODE:-}" == token ]] && echo "export RAY_AUTH_MODE=token"
    [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]] && echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    echo "# GCS clients (ray status, ray.init) reach the loopback-only head when this is set too:"
    echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    echo "# ray status --address 127.0.0.1:$gcs_port ; ray.init(address=\"127.0.0.1:$gcs_port\")"
  } > "$ENV_FILE"
  echo "Ray head running on 127.0.0.1 (pid $pid, GCS port $gcs_port, log $LOG_FILE). Use it with:"
  cat "$ENV_FILE"
  echo "(or: source $ENV_FILE)"
}

stop_pid() {
  local pid="$1"
  kill -TERM "$pid" 2>/dev/null || return 0
  # `ray start --block` tears its raylet, GCS and dashboard down on SIGTERM; give it time to drain.
  local deadline=$((SECONDS + 40))
  while alive "$pid" && (( SECONDS < deadline )); do sleep 0.5; done
  if alive "$pid"; then
    echo "pid $pid ignored SIGTERM; killing its process group" >&2
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
}

cmd_stop() {
  if [[ "${1:-}" == --all ]]; then
    echo "ray stop: ending every Ray process on this machine" >&2
    "$RAY_BIN" stop
    rm -f "$PID_FILE" "$ENV_FILE"
    return 0
  fi
  local pid; pid="$(head_pid || true)"
  if ! alive "$pid"; then
    rm -f "$PID_FILE" "$ENV_FILE"
    echo "no cluster started by this script is running (state in $STATE_DIR); 'stop --all' runs ray stop" >&2
    return 0
  fi
  stop_pid "$pid"
  rm -f "$PID_FILE" "$ENV_FILE"
  echo "stopped the Ray head (pid $pid)"
}

cmd_status() {
  local pid url; pid="$(head_pid || true)"; url="$(dashboard_url || true)"
  if alive "$pid" && [[ -n "$url" ]] && answers "$url"; then
    echo "running: pid $pid, dashboard $url"
    cat "$ENV_FILE"
    return 0
  fi
  if alive "$pid"; then echo "starting or unhealthy: pid $pid, dashboard ${url:-unknown} does not answer"
  else echo "not running (state in $STATE_DIR)"; fi
  return 3
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) shift; cmd_status "$@" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
