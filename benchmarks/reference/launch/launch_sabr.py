"""Run SABR's src/main.py (eth-sri/SABR) unchanged, with our CNN3 registered as --net CNN3.
Run from the repository directory:

  cd $REF_ROOT/SABR
  OMP_NUM_THREADS=1 $REF_ROOT/venvs/SABR/bin/python \\
      $TIGHTROPE/benchmarks/reference/launch/launch_sabr.py <src/main.py flags>

CNN3 here = SABR's own myNet builder (the class of its CNN7) with conv_widths [1, 2] (x16),
kernels [5, 4], strides [2, 2], paddings [2, 1], no hidden linear layer, BN after each conv
(--bn), and our MNIST normalisation (mean 0.1307, std 0.3081; SABR's MNIST nets use 0 / 1):
Normalization -> Conv(16,5,2,2)-BN-ReLU -> Conv(32,4,2,1)-BN-ReLU -> Flatten -> Linear(10).

Also: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (SABR loads its own pickled .pynet files), and
torch.onnx.export (called once after the last epoch, after the final .pynet is saved)
is wrapped so that a failure (torch 2.13's exporter wants onnxscript, not installed) prints a
warning instead of aborting before SABR's MN-BaB conversion; we export weights ourselves.
torch threads: OMP_NUM_THREADS (default 1).
"""
import os
import runpy
import sys

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
# SABR torch.load()s its own pickled networks (--saved_net, and the MN-BaB conversion after the
# last epoch); torch >= 2.6 defaults to weights_only=True, which refuses them.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
repo = os.getcwd()
main_py = os.path.join(repo, "src", "main.py")
if not os.path.isfile(main_py):
    sys.exit("run this from the SABR repository directory (src/main.py not found)")
sys.path.insert(0, repo)  # the README's `export PYTHONPATH=$PWD`

import src.networks as networks  # noqa: E402

MEAN, STD = 0.1307, 0.3081


def cnn3(dataset, bn, bn2, device="cuda"):
    if dataset != "mnist":
        raise ValueError(f"CNN3 is registered for MNIST only, not {dataset!r}")
    in_ch, in_dim, n_class = networks.get_dataset_info(dataset)
    return networks.myNet(device, dataset, n_class, in_dim, in_ch,
                          conv_widths=[1, 2], kernel_sizes=[5, 4], linear_sizes=[],
                          strides=[2, 2], paddings=[2, 1], net_dim=None, bn=bn, bn2=bn2,
                          mean=MEAN, sigma=STD)


networks.Models["CNN3"] = cnn3

_export = torch.onnx.export


def _safe_export(*args, **kwargs):
    try:
        return _export(*args, **kwargs)
    except Exception as error:  # any exporter failure: we export weights ourselves
        print(f"[launch_sabr] torch.onnx.export failed ({type(error).__name__}: {error}); "
              "skipped (export the .pynet with benchmarks/reference/export.py sabr)")


torch.onnx.export = _safe_export

sys.argv = [main_py, *sys.argv[1:]]
runpy.run_path(main_py, run_name="__main__")
