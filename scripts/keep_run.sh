#!/usr/bin/env bash
# Keep the record of finished runs in the repository: copy what tightrope-report reads (and the
# selected weights) from each run directory under runs/ into the same path under results/runs/,
# so that the tables and figures of results/ can be regenerated on any checkout (runs/ is not
# version-controlled; last.pt and the TensorBoard logs stay there).
# Usage: scripts/keep_run.sh [--unfinished] RUN_DIR...
#   RUN_DIR   a tightrope-train run directory under runs/, e.g.
#             runs/mnist_cpu/eps0.1/ibp/mnist-ibp-cnn3-20261207-152916
# Copied: config.yaml, meta.json, metrics.csv, test_metrics.json, best.pt (the selected
# checkpoint, ~300 KB for CNN3) and, of each certification directory inside
# it (certify*/ with run.json), run.json, summary.json, summary.txt and samples.csv (gzipped:
# samples.csv.gz). A run whose training or certification has not finished is refused (keep it
# once it has).
#   --unfinished  instead, carry an unfinished run to another machine: copy the run directory
#                 without its TensorBoard logs (last.pt with the optimiser state included) to
#                 results/unfinished/<same path>; copy it back under runs/ there and rerun
#                 scripts/results_row.sh, which resumes training and certification.
set -euo pipefail

[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
root="$(cd "$(dirname "$0")/.." && pwd)"

# Sets run (absolute) and relative (its path below runs/) for the run directory $1.
locate() {
  [[ -d "$1" ]] || { echo "keep_run.sh: no such directory: $1" >&2; exit 2; }
  run="$(cd "$1" && pwd)"
  relative="${run#"$root"/runs/}"
  [[ "$relative" != "$run" ]] || { echo "keep_run.sh: $1 is not under $root/runs/" >&2; exit 2; }
}

if [[ "$1" == --unfinished ]]; then
  shift
  for given in "$@"; do
    locate "$given"
    [[ -f "$run/last.pt" ]] || { echo "keep_run.sh: $given has no last.pt" >&2; exit 2; }
    target="$root/results/unfinished/$relative"
    rm -rf "$target"
    mkdir -p "$target"
    (cd "$run" && find . -path ./tensorboard -prune -o -type f -print0 |
       xargs -0 -I{} cp --parents {} "$target/")
    echo "kept unfinished $relative -> results/unfinished/$relative"
  done
  exit 0
fi

for given in "$@"; do
  locate "$given"
  for file in config.yaml meta.json metrics.csv test_metrics.json best.pt; do
    [[ -f "$run/$file" ]] || { echo "keep_run.sh: $given has no $file (training unfinished?)" >&2; exit 1; }
  done
  target="$root/results/runs/$relative"
  mkdir -p "$target"
  cp "$run"/{config.yaml,meta.json,metrics.csv,test_metrics.json,best.pt} "$target/"
  for certify in "$run"/certify*/; do
    [[ -f "$certify/run.json" ]] || continue
    name="$(basename "$certify")"
    [[ -f "$certify/summary.json" ]] || {
      echo "keep_run.sh: $given/$name has no summary.json (certification unfinished?)" >&2; exit 1; }
    mkdir -p "$target/$name"
    for file in run.json summary.json summary.txt; do
      cp "$certify/$file" "$target/$name/"
    done
    if [[ -f "$certify/samples.csv" ]]; then
      gzip -9 -n -c "$certify/samples.csv" > "$target/$name/samples.csv.gz"
    fi
  done
  echo "kept $relative -> results/runs/$relative"
done
