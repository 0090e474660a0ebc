#!/usr/bin/env bash
# Submit a training run (or a study) to a Ray cluster: a thin wrapper of
#   ray job submit --working-dir . --runtime-env launch/runtime_env.yaml -- gmp-dist train CONFIG ...
#
# usage: launch/submit.sh [--no-wait] [--submission-id ID] [--address URL] [--command train|study] CONFIG [args]
#   args go to `gmp-dist COMMAND CONFIG`, e.g. --set train.epochs=5; a study needs --out DIR on shared storage
#
#   RAY_ADDRESS          the cluster's dashboard URL (default http://127.0.0.1:8265)
#   RAY_AUTH_MODE        "token" when the cluster uses token authentication; set automatically when the
#                        cluster reports it. The token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
#                        ~/.ray/auth_token (copy it from the head node).
#   MLFLOW_TRACKING_URI  forwarded to the job's driver (an MLflow server every node can reach)
#   GMP_DIST_ENTRYPOINT  the command run on the cluster (default "gmp-dist"; e.g. "python -m gmp_dist")
#   RAY_BIN              the ray executable (default: the repository's .venv, else ray on PATH)
#
# Waits for the job, streaming its logs, and exits with its status: 0 succeeded, the entrypoint's exit
# code when it failed (2 = bad config or input), 1 for other failures or a stopped job. Exit 2 before
# submitting when the config does not exist or the cluster does not answer.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "submit.sh: error: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
NO_WAIT=0
SUBMISSION_ID=""
COMMAND="train"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --no-wait) NO_WAIT=1; shift ;;
    --submission-id) [[ $# -ge 2 ]] || die "--submission-id needs a value"; SUBMISSION_ID="$2"; shift 2 ;;
    --address) [[ $# -ge 2 ]] || die "--address needs a value"; ADDRESS="$2"; shift 2 ;;
    --command) [[ $# -ge 2 ]] || die "--command needs a value"; COMMAND="$2"; shift 2
               [[ "$COMMAND" == train || "$COMMAND" == study ]] || die "--command must be train or study, got $COMMAND" ;;
    --) shift; break ;;
    -*) die "unknown option $1 (options come before CONFIG; see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; die "missing CONFIG (a YAML file such as configs/quickstart/gmp90.yaml)"; }
CONFIG="$1"; shift

# --- the config must exist and lie inside the repository, which is what Ray uploads as the job's cwd.
[[ -f "$CONFIG" ]] || die "config file $CONFIG does not exist (give a YAML file inside the repository, e.g. configs/quickstart/gmp90.yaml)"
CONFIG_ABS="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
case "$CONFIG_ABS" in
  "$REPO_ROOT"/*) CONFIG_REL="${CONFIG_ABS#"$REPO_ROOT"/}" ;;
  *) die "config file $CONFIG is outside the repository $REPO_ROOT; the job only sees the uploaded repository, so copy the config under configs/" ;;
esac

# --- which ray
if [[ -n "${RAY_BIN:-}" ]]; then :
elif [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then RAY_BIN="$REPO_ROOT/.venv/bin/ray"
elif command -v ray >/dev/null 2>&1; then RAY_BIN="$(command -v ray)"
else die "the ray command was not found (run make install, or set RAY_BIN)"; fi
# The Python that runs ray (pip writes it into the script's #! line): it has ray.job_submission.
RAY_PY="$(head -n 1 "$RAY_BIN" | sed -n 's/^#!\([^ ]*python[^ ]*\).*/\1/p')"
[[ -x "${RAY_PY:-}" ]] || RAY_PY="$(command -v python3 || echo python3)"

# --- the cluster must answer before we upload anything; its public auth-mode endpoint also says
# whether the client must send a token.
[[ "$ADDRESS" == *://* ]] || ADDRESS="http://$ADDRESS"
ADDRESS="${ADDRESS%/}"
http_get() {  # URL -> body on stdout; fails on no answer or an HTTP error, within 5 s
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 5 "$1" 2>/dev/null
  else
    "$RAY_PY" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1" 2>/dev/null
  fi
}
if ! AUTH_REPLY="$(http_get "$ADDRESS/api/authentication_mode")"; then
  die "cluster at $ADDRESS does not answer; start one with launch/local_cluster.sh start or set RAY_ADDRESS to the dashboard URL of a running cluster (http://<head>:8265)"
fi
if [[ "$AUTH_REPLY" == *'"token"'* ]]; then
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
  if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
    die "cluster at $ADDRESS requires a token: copy ~/.ray/auth_token from the head node, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
  fi
fi

# --- submit
SUBMISSION_ID="${SUBMISSION_ID:-gmp-$(basename "${CONFIG_REL%.*}")-$(date +%Y%m%d-%H%M%S)-$RANDOM}"
read -r -a ENTRYPOINT <<< "${GMP_DIST_ENTRYPOINT:-gmp-dist}"
JOB_ENV=()
COMMIT="$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || true)"
# The uploaded working dir has no .git: the run's git-commit tag comes from here.
[[ -n "$COMMIT" ]] && JOB_ENV+=("GMP_DIST_GIT_COMMIT=$COMMIT")
[[ -n "${MLFLOW_TRACKING_URI:-}" ]] && JOB_ENV+=("MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI")
WAIT_FLAG=()
[[ "$NO_WAIT" == 1 ]] && WAIT_FLAG=(--no-wait)

cd "$REPO_ROOT"
echo "submitting $CONFIG_REL to $ADDRESS as job $SUBMISSION_ID" >&2
set +e
"$RAY_BIN" job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID" \
  --working-dir . --runtime-env launch/runtime_env.yaml ${WAIT_FLAG[@]+"${WAIT_FLAG[@]}"} \
  -- env ${JOB_ENV[@]+"${JOB_ENV[@]}"} "${ENTRYPOINT[@]}" "$COMMAND" "$CONFIG_REL" "$@"
SUBMIT_RC=$?
set -e
if [[ "$NO_WAIT" == 1 ]]; then
  [[ $SUBMIT_RC == 0 ]] && echo "follow it with: $RAY_BIN job logs --follow --address $ADDRESS $SUBMISSION_ID" >&2
  exit "$SUBMIT_RC"
fi

# `ray job submit` exits 0 for a stopped job and 1 for any failure: ask the job's own outcome.
OUTCOME="$("$RAY_PY" - "$ADDRESS" "$SUBMISSION_ID" 2>/dev/null <<'PY' || true
import sys
from ray.job_submission import JobSubmissionClient
info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])
status = getattr(info.status, "value", info.status)
print(status, "" if info.driver_exit_code is None else info.driver_exit_code)
PY
)"
read -r STATUS CODE <<< "${OUTCOME:-UNKNOWN}"
case "$STATUS" in
  SUCCEEDED) exit 0 ;;
  FAILED) echo "job $SUBMISSION_ID failed${CODE:+ with exit code $CODE}" >&2
          [[ -n "${CODE:-}" && "$CODE" != 0 ]] && exit "$CODE"; exit 1 ;;
  STOPPED) echo "job $SUBMISSION_ID was stopped" >&2; exit 1 ;;
  *) # Interrupted while tailing, or the job is still running: it goes on on the cluster.
     echo "job $SUBMISSION_ID has not finished (status ${STATUS}); follow it with $RAY_BIN job logs --follow --address $ADDRESS $SUBMISSION_ID, stop it with $RAY_BIN job stop --address $ADDRESS $SUBMISSION_ID" >&2
     exit $(( SUBMIT_RC == 0 ? 1 : SUBMIT_RC )) ;;
esac
