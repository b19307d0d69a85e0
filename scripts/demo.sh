#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh --data), train CNN3 on Fashion-MNIST at eps=0.1 with
# certified (IBP) training on the CPU, then certify the test set with the best checkpoint
# (by validation) through the full cascade and print the summary table.
# Usage: scripts/demo.sh [--samples N] [--timeout S] [--config FILE]
#   --samples  certify the first N test samples (default: all 10000)
#   --timeout  seconds per sample for branch-and-bound (default 2)
#   --config   training config (default configs/fashion_mnist/cpu_ibp.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."

samples=""
timeout=2
config=configs/fashion_mnist/cpu_ibp.yaml
while [[ $# -gt 0 ]]; do
  case "$1" in
    --samples) samples="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

scripts/setup.sh --data
threads="$(nproc)"
echo "== training ($config)"
.venv/bin/tightrope-train --config "$config" --out runs/demo --device cpu --threads "$threads"
run="$(ls -td runs/demo/*/ | head -1)"
run="${run%/}"
limit=()
if [[ -n "$samples" ]]; then
  limit=(--samples "$samples")
fi
echo "== certifying ${samples:-all} test samples with $run/best.pt"
.venv/bin/tightrope-certify --checkpoint "$run/best.pt" "${limit[@]}" \
  --timeout "$timeout" --threads "$threads" --out "$run/certify"
echo
echo "run directory: $run"
echo "  training metrics: $run/metrics.csv; per-sample results: $run/certify/samples.csv"
echo "  TensorBoard:      .venv/bin/tensorboard --logdir $run/tensorboard"
