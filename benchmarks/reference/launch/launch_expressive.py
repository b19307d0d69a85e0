"""Run De Palma et al.'s train.py (alessandrodepalma/expressive-losses) unchanged, with our CNN3
registered as --model=cnn3 (see ref_cnn3.py). Run from the repository directory (it reads
config/*.json and ./data relative to the working directory):

  cd $REF_ROOT/expressive-losses
  OMP_NUM_THREADS=1 $REF_ROOT/venvs/expressive-losses/bin/python \\
      $TIGHTROPE/benchmarks/reference/launch/launch_expressive.py <train.py flags>

torch threads: OMP_NUM_THREADS (default 1).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lirpa_launch

utils = lirpa_launch.prepare()


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

lirpa_launch.run_train()
