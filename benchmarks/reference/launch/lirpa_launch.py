"""What both auto_LiRPA-based launchers (launch_fast_ibp.py, launch_expressive.py) do before
they hand over to the repository's train.py: set torch's threads from OMP_NUM_THREADS (default
1), check that the working directory is the repository, put it and this folder on the path,
alias auto_LiRPA 0.7.1's input-node name (ref_lirpa_compat) and register our CNN3 as
--model=cnn3 in the repository's ``models`` and ``utils`` modules (ref_cnn3)."""
import importlib
import os
import runpy
import sys
from types import ModuleType

import torch


def prepare() -> ModuleType:
    """Set everything up; returns the repository's ``utils`` module (to patch, if needed)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    repo = os.getcwd()
    if not os.path.isfile(os.path.join(repo, "train.py")):
        sys.exit("run this from the repository directory (train.py not found in the working "
                 "directory)")
    sys.path.insert(0, repo)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ref_cnn3
    import ref_lirpa_compat

    ref_lirpa_compat.install()
    ref_cnn3.register(importlib.import_module("models"))  # the repository's models package
    utils = importlib.import_module("utils")  # prepare_model does eval(args.model) there
    ref_cnn3.register(utils)
    return utils


def run_train() -> None:
    """Run the repository's train.py as a script, with this process's arguments."""
    script = os.path.join(os.getcwd(), "train.py")
    sys.argv = [script, *sys.argv[1:]]
    runpy.run_path(script, run_name="__main__")
