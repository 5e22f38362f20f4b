#!/usr/bin/env bash
# Screenshot of the MLflow UI's run comparison page for one experiment's evaluation runs (headless Chromium).
#
#   scripts/screenshot_mlflow.sh EXPERIMENT [OUT.png] [BACKEND_STORE_URI]
#
# Starts `mlflow server` on 127.0.0.1 (a free port) over the store (default: the project's
# sqlite:///.apexdsp/mlflow.db), finds the experiment's finished evaluation runs through the REST API,
# opens #/compare-runs?runs=[...] in headless Chromium (Debian package `chromium`) and writes the PNG.
# The server is stopped on exit. WINDOW=W,H sets the page size (default 1600,2600: plots, params, metrics).
set -euo pipefail
EXPERIMENT="${1:?usage: $0 EXPERIMENT [OUT.png] [BACKEND_STORE_URI]}"
OUT="${2:-mlflow-compare-${EXPERIMENT}.png}"
STORE="${3:-sqlite:///$(pwd)/.apexdsp/mlflow.db}"
PY="${PYTHON:-.venv/bin/python}"
CHROMIUM="$(command -v chromium || command -v chromium-browser || true)"
[ -n "$CHROMIUM" ] || { echo "chromium not found: apt-get install -y chromium" >&2; exit 2; }
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:${PORT}"
# Offline, litellm (imported by the server's job registry) fetches its cost map in a background thread whose
# log call deadlocks the import: the server never listens. The local map avoids the fetch.
export LITELLM_LOCAL_MODEL_COST_MAP=True HF_HUB_OFFLINE=1
"$(dirname "$PY")/mlflow" server --backend-store-uri "$STORE" --host 127.0.0.1 --port "$PORT" --workers 1 \
  >/tmp/apexdsp-mlflow-ui-$PORT.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
"$PY" - "$URL" <<'PYEOF'
import sys, time, requests
for _ in range(600):
    try:
        if requests.get(sys.argv[1] + "/health", timeout=2).ok:
            sys.exit(0)
    except requests.RequestException:
        pass
    time.sleep(0.5)
sys.exit("mlflow server did not start")
PYEOF
PAGE="$("$PY" - "$URL" "$EXPERIMENT" <<'PYEOF'
import json, sys, urllib.parse, requests
url, name = sys.argv[1], sys.argv[2]
exp = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name}).json()
exp_id = exp["experiment"]["experiment_id"]
runs = requests.post(f"{url}/api/2.0/mlflow/runs/search", json={"experiment_ids": [exp_id], "max_results": 500,
                     "filter": "attributes.status = 'FINISHED'"}).json().get("runs", [])
ids = [r["info"]["run_id"] for r in runs
       if {t["key"]: t["value"] for t in r["data"].get("tags", [])}.get("apexdsp.step") == "evaluate"]
if not ids:
    sys.exit(f"no finished evaluation runs in experiment {name!r}")
query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp_id])})
print(f"{url}/#/compare-runs?{query}")
PYEOF
)"
echo "page: $PAGE" >&2
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${WINDOW:-1600,2600}" \
  --virtual-time-budget=20000 --screenshot="$OUT" "$PAGE" 2>/dev/null
echo "$OUT"
