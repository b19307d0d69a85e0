"""Run De Palma et al.'s train.py (alessandrodepalma/expressive-losses) unchanged, with our CNN3
registered as --model=cnn3 (see ref_cnn3.py). Run from the repository directory (it reads
config/*.json and ./data relative to the working directory):

  cd $REF_ROOT/expressive-losses
  OMP_NUM_THREADS=1 $REF_ROOT/venvs/expressive-losses/bin/python \\
      $TIGHTROPE/benchmarks/reference/launch/launch_expressive.py <train.py flags>

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


def update_state_dict(model, model_loss):
    """Copy the BoundedModule's tensors (BatchNorm running statistics included) back into the
    plain model, translating each auto_LiRPA node name through ``model_loss.node_name_map``:
    the same effect as the utils.update_state_dict of Shi et al.'s current code (commit 86f755c,
    "Support latest version of pytorch"). The expressive-losses version strips prefixes of the
    old auto_LiRPA naming instead and raises KeyError('/1.buffer') with auto_LiRPA 0.7.1."""
    renamed = {model_loss.node_name_map[name]: value
               for name, value in model_loss.state_dict().items()}
    model.load_state_dict({**model.state_dict(), **renamed})


utils.update_state_dict = update_state_dict

sys.argv = [os.path.join(repo, "train.py"), *sys.argv[1:]]
runpy.run_path(os.path.join(repo, "train.py"), run_name="__main__")
