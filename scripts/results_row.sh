#!/usr/bin/env bash
# One row of the results table: train a config on the CPU, then certify its selected checkpoint
# (best.pt: the epoch the method's model-selection rule keeps) on the whole test split.
# Usage: scripts/results_row.sh CONFIG [--threads N] [--timeout T] [--samples N]
#                                [--set KEY=VALUE]... [--name NAME]
#   CONFIG     configs/<group>/<setting>/<method>.yaml, e.g. configs/mnist_cpu/eps0.3/ibp.yaml;
#              trained into runs/<group>/<setting>/<method>/<dataset>-<method>-<model>-<time>/
#   --threads  torch CPU threads for training and certification (default: nproc)
#   --timeout  seconds per sample for certification (default 10, a CPU-scale budget; the papers
#              give 100-1800 s)
#   --samples  certify the first N test samples (default: all, 10000 on MNIST)
#   --set      a config override for tightrope-train (repeatable), e.g. loss.options.alpha=0.3
#   --name     the run folder's name in place of <method> (needed with --set, e.g. for sweeps:
#              --set loss.options.alpha=0.3 --name mtl_ibp_alpha0.3)
# Both commands are printed before they run. Rerunning is safe: a run whose last.pt exists but
# whose training has not finished (no test_metrics.json, which tightrope-train writes last) is
# continued with --resume (its stored config, not CONFIG, is used); a finished one is not
# trained again; certification skips the samples already recorded in RUN/certify (a rerun with
# other --timeout/--samples into it is refused by tightrope-certify). Exits non-zero when a step
# fails.
set -euo pipefail

usage() { sed -n '4,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || usage
given="$1"
shift
threads="$(nproc)"
timeout=10
samples=""
name=""
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --threads|--timeout|--samples|--set|--name)
      [[ $# -ge 2 ]] || { echo "results_row.sh: $1 needs a value" >&2; exit 2; }
      case "$1" in
        --threads) threads="$2" ;;
        --timeout) timeout="$2" ;;
        --samples) samples="$2" ;;
        --set) overrides+=("$2") ;;
        --name) name="$2" ;;
      esac
      shift 2 ;;
    -h|--help) usage ;;
    *) echo "results_row.sh: unknown argument: $1" >&2; usage ;;
  esac
done

[[ -f "$given" ]] || { echo "results_row.sh: no such config: $given" >&2; exit 2; }
root="$(cd "$(dirname "$0")/.." && pwd)"
config="$(cd "$(dirname "$given")" && pwd)/$(basename "$given")"
relative="${config#"$root"/configs/}"
if [[ "$relative" == "$config" || "$relative" != */*/*.yaml || "$relative" == */*/*/* ]]; then
  echo "results_row.sh: CONFIG must be configs/<group>/<setting>/<method>.yaml, got $given" >&2
  exit 2
fi
if [[ ${#overrides[@]} -gt 0 && -z "$name" ]]; then
  echo "results_row.sh: --set needs --name (the run folder of the changed config)" >&2
  exit 2
fi
cd "$root"
out="runs/${relative%.yaml}"
if [[ -n "$name" ]]; then
  [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "results_row.sh: bad --name $name" >&2; exit 2; }
  out="$(dirname "$out")/$name"
fi
bin="${VENV:-.venv}/bin"

show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

# The newest run directory under $out that holds a checkpoint (tightrope-train names them
# <dataset>-<method>-<model>-<UTC time>[-k], so the glob's order is their start order).
latest_run() {
  local found="" dir
  for dir in "$out"/*/; do
    [[ -f "$dir/last.pt" ]] && found="${dir%/}"
  done
  printf '%s' "$found"
}

run="$(latest_run)"
if [[ -n "$run" && -f "$run/test_metrics.json" ]]; then
  echo "== training: finished in $run (test_metrics.json present); not trained again"
else
  if [[ -n "$run" ]]; then
    train=("$bin/tightrope-train" --resume "$run" --device cpu --threads "$threads")
    echo "== training: resuming the unfinished run $run from its last.pt"
  else
    train=("$bin/tightrope-train" --config "${config#"$root"/}" --out "$out" --device cpu
           --threads "$threads" ${overrides[@]+"${overrides[@]}"})
    echo "== training into $out/"
  fi
  show "${train[@]}"
  "${train[@]}"
  run="$(latest_run)"
  [[ -n "$run" ]] || { echo "results_row.sh: training left no last.pt under $out" >&2; exit 1; }
fi
[[ -f "$run/best.pt" ]] || { echo "results_row.sh: no $run/best.pt to certify" >&2; exit 1; }

certify=("$bin/tightrope-certify" --checkpoint "$run/best.pt" --timeout "$timeout"
         --out "$run/certify" --device cpu --threads "$threads")
if [[ -n "$samples" ]]; then
  certify+=(--samples "$samples")
fi
echo "== certifying ${samples:-all} test samples with $run/best.pt"
show "${certify[@]}"
"${certify[@]}"
echo "run directory: $run (training: metrics.csv, test_metrics.json; certification:"
echo "  certify/summary.txt, certify/samples.csv)"
