"""Run Shi et al.'s train.py (shizhouxing/Fast-Certified-Robust-Training) unchanged, with our CNN3
registered as --model=cnn3 (see ref_cnn3.py). Run from the repository directory (it reads
config/*.json and ./data relative to the working directory):

  cd $REF_ROOT/Fast-Certified-Robust-Training
  OMP_NUM_THREADS=1 $REF_ROOT/venvs/Fast-Certified-Robust-Training/bin/python \\
      $TIGHTROPE/benchmarks/reference/launch/launch_fast_ibp.py <train.py flags>

torch threads: OMP_NUM_THREADS (default 1).
"""
import os
import runpy
import sys

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
repo = os.getcwd()
if not os.path.isfile(os.path.join(repo, "train.py")):
    sys.exit("run this from the repository directory (train.py not found in the working directory)")
sys.path.insert(0, repo)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import models  # noqa: E402  (the repository's models package)
import ref_cnn3  # noqa: E402
import ref_lirpa_compat  # noqa: E402

ref_lirpa_compat.install()

ref_cnn3.register(models)
import utils  # noqa: E402  (the repository's utils: prepare_model does eval(args.model) here)

ref_cnn3.register(utils)

sys.argv = [os.path.join(repo, "train.py"), *sys.argv[1:]]
runpy.run_path(os.path.join(repo, "train.py"), run_name="__main__")
