#!/usr/bin/env bash
# An MLflow tracking server for runs that span machines (Ray workers on other nodes, submitted jobs).
#
# usage: launch/mlflow_server.sh [--backend URI] [--artifacts DIR_OR_URI] [--host HOST] [--port PORT]
#                                [--workers N] [-- extra `mlflow server` args]
#
#   --backend    run metadata store: sqlite:///ABSOLUTE/path.db (default sqlite:///$PWD/mlflow.db, the same
#                file local runs write) or postgresql://USER:PASSWORD@HOST:5432/DB (needs psycopg2-binary)
#   --artifacts  where the server keeps artifacts (checkpoints, layers.png, ...): a folder or s3://, gs://
#                URI (default $PWD/mlartifacts). Clients upload through the server (proxied artifacts),
#                so workers need no storage credentials.
#   --host       interface to bind (default 127.0.0.1, this machine only). For a cluster bind the address
#                the nodes reach and add `-- --allowed-hosts HOST:PORT` (MLflow 3 refuses other Host headers).
#   --port       default 5000;  --workers  server processes (default 2)
#
# Runs in the foreground (stop it with Ctrl-C, or kill its process group) after printing the
# MLFLOW_TRACKING_URI to export on the machines that log to it.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "mlflow_server.sh: error: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BACKEND="sqlite:///$PWD/mlflow.db"
ARTIFACTS="$PWD/mlartifacts"
HOST=127.0.0.1
PORT=5000
WORKERS=2
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --backend) [[ $# -ge 2 ]] || die "--backend needs a URI"; BACKEND="$2"; shift 2 ;;
    --artifacts) [[ $# -ge 2 ]] || die "--artifacts needs a folder or URI"; ARTIFACTS="$2"; shift 2 ;;
    --host) [[ $# -ge 2 ]] || die "--host needs a value"; HOST="$2"; shift 2 ;;
    --port) [[ $# -ge 2 ]] || die "--port needs a value"; PORT="$2"; shift 2 ;;
    --workers) [[ $# -ge 2 ]] || die "--workers needs a value"; WORKERS="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got $PORT"

if [[ -n "${MLFLOW_BIN:-}" ]]; then :
elif [[ -x "$REPO_ROOT/.venv/bin/mlflow" ]]; then MLFLOW_BIN="$REPO_ROOT/.venv/bin/mlflow"
elif command -v mlflow >/dev/null 2>&1; then MLFLOW_BIN="$(command -v mlflow)"
else die "the mlflow command was not found (run make install, or set MLFLOW_BIN)"; fi

case "$BACKEND" in
  sqlite) BACKEND="sqlite:///$PWD/mlflow.db" ;;
  sqlite:////*) ;;
  sqlite:///*)  # relative: pin it to this folder so the server and direct sqlite users agree
    BACKEND="sqlite:///$PWD/${BACKEND#sqlite:///}" ;;
  postgresql*|mysql*|mssql*) ;;
  *) die "--backend must be sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB, got $BACKEND" ;;
esac
if [[ "$BACKEND" == sqlite:///* ]]; then
  mkdir -p "$(dirname "${BACKEND#sqlite:///}")"
fi
case "$ARTIFACTS" in
  *://*) ;;
  *) mkdir -p "$ARTIFACTS"; ARTIFACTS="$(cd "$ARTIFACTS" && pwd)" ;;
esac

# MLflow 3 servers also start a GenAI job runner (six queue consumers); this project submits no such jobs,
# and on a small machine they double the start-up time. Set it to true to get them back.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

echo "MLflow server on http://$HOST:$PORT (backend ${BACKEND%%://*}, artifacts $ARTIFACTS). Log to it with:"
echo "export MLFLOW_TRACKING_URI=http://$HOST:$PORT"
exec "$MLFLOW_BIN" server --host "$HOST" --port "$PORT" --workers "$WORKERS" \
  --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" ${EXTRA[@]+"${EXTRA[@]}"}
