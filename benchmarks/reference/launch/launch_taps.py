"""Run TAPS's mix_train.py (eth-sri/TAPS) unchanged, with our CNN3 registered as
--net cnn_3layer_bn (launch_taps_net.py). Run from the repository directory (it reads ./data):

  cd $REF_ROOT/TAPS
  OMP_NUM_THREADS=1 $REF_ROOT/venvs/TAPS/bin/python \\
      $TIGHTROPE/benchmarks/reference/launch/launch_taps.py <mix_train.py flags>

Also: loaders.get_loaders is called by mix_train with its default num_workers=8; on this 2-core
machine the launcher passes REF_NUM_WORKERS (default 0: load in the main process) instead. Data
loading only; batches, order and transforms are unchanged.
torch threads: OMP_NUM_THREADS (default 1).
"""
import os
import runpy
import sys

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
repo = os.getcwd()
main_py = os.path.join(repo, "mix_train.py")
if not os.path.isfile(main_py):
    sys.exit("run this from the TAPS repository directory (mix_train.py not found)")
sys.path.insert(0, repo)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import launch_taps_net  # noqa: E402,F401
import loaders  # noqa: E402

_get_loaders = loaders.get_loaders


def get_loaders(args, num_workers: int = 8, shuffle_test: bool = False):
    return _get_loaders(args, num_workers=int(os.environ.get("REF_NUM_WORKERS", "0")),
                        shuffle_test=shuffle_test)


loaders.get_loaders = get_loaders

sys.argv = [main_py, *sys.argv[1:]]
runpy.run_path(main_py, run_name="__main__")
