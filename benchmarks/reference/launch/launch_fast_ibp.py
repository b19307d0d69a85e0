"""Run Shi et al.'s train.py (shizhouxing/Fast-Certified-Robust-Training) unchanged, with our CNN3
registered as --model=cnn3 (see ref_cnn3.py). Run from the repository directory (it reads
config/*.json and ./data relative to the working directory):

  cd $REF_ROOT/Fast-Certified-Robust-Training
  OMP_NUM_THREADS=1 $REF_ROOT/venvs/Fast-Certified-Robust-Training/bin/python \\
      $TIGHTROPE/benchmarks/reference/launch/launch_fast_ibp.py <train.py flags>

torch threads: OMP_NUM_THREADS (default 1).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lirpa_launch

lirpa_launch.prepare()

lirpa_launch.run_train()
