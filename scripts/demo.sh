#!/usr/bin/env bash
# The whole mission on the embedded default (a 2-core laptop is enough): demo phantoms -> DVC pipeline
# (ingest -> tune -> evaluate -> register) -> promotion gate -> where to look next. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}"
export DVC_NO_ANALYTICS=1 RAY_USAGE_STATS_ENABLED=0  # the demo profile downloads nothing; paper may

# The demo dataset is generated, not downloaded: same seed, byte-identical files, so data.dvc matches.
if ! dvc status -q data.dvc 2>/dev/null || [ ! -d data/lits ]; then
  liverseg synth --out data/lits --cases 20 --seed 0 --shape 96 96 40
fi
dvc commit -q -f data.dvc  # hash and cache the raw folder; unchanged for the same seed
dvc repro
liverseg promote --store data/store.zarr --raw data/lits --name liver-unet --min-dice 0.9
dvc push -q || echo "note: dvc push to the local remote failed (see .dvc/config)"

echo
echo "== Where to look =="
python - <<'PY'
import json
m = json.load(open("metrics/test-metrics.json"))
print(f"Test Dice:       {m['dice']['mean']:.4f} (LiTS: mean over {m['n_cases']} test volumes, original grid); "
      f"HD95 {m['hd95_mm']['mean']:.2f} mm")
PY
echo "All metrics:     dvc metrics show   (experiments: dvc exp show)"
echo "MLflow UI:       mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI"
exp=$(python -c "import mlflow; print(mlflow.MlflowClient().get_experiment_by_name('liverseg').experiment_id)")
echo "                 then http://127.0.0.1:5000/#/experiments/$exp/runs?workflowType=machine_learning"
echo "                 (unfold 'liverseg-tune' for its trials; Columns: val_dice, train.lr, loss.*)"
echo "Plots:           dvc plots show   (training curves; val_dice against lr and loss weights)"
echo "Tutorial:        docs/tutorial.md"
echo "Champion:        liverseg lineage models:/liver-unet@champion"
echo "Serve it:        liverseg serve --model models:/liver-unet@champion --port 8080"
echo "Segment a CT:    liverseg predict IN.nii.gz OUT.nii.gz"
