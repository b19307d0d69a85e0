r"""Export a CNN3 trained by a reference repository to tightrope's cnn3 layout.

Run with our venv (it imports tightrope), from the tightrope repository root:

  .venv/bin/python benchmarks/reference/export.py fast_ibp \
      $REF_ROOT/runs/fast_ibp/eps0.1/ckpt_best \
      --out $REF_ROOT/exports/fast_ibp/eps0.1/best.pt --config configs/mnist_cpu/eps0.1/ibp.yaml

Writes
  <out>                a complete tightrope-train checkpoint (tightrope.train.load_checkpoint,
                       `tightrope-certify --checkpoint <out>`), and
  <out>.state_dict.pt  the bare state dict (keys 0.mean 0.std 1.weight ... 8.bias) for
                       tightrope.train.models.cnn3(in_channels=1, input_size=28, num_classes=10,
                       mean=[m], std=[s]),
then prints the clean accuracy on the first 1,000 test images.

Kinds and the checkpoints they read:
  fast_ibp    Shi et al.'s train.py: <dir>/ckpt_best, ckpt_last or ckpt_<epoch>, a dict
              {'state_dict', 'optimizer', 'epoch', 'best'} whose state_dict keys are ours already
              (the model is launch/ref_cnn3.py).
  expressive  De Palma et al.'s train.py: <dir>/cnn3_fast_<time>_ckpt_last (or _ckpt_<epoch>),
              the same dict without 'best'.
  sabr        SABR's pickled abstract network <run>.pynet (last epoch), <run>_epoch_current.pynet
              or <run>_epoch_<k>.pynet; unpickling imports src.AIDomains from the SABR checkout
              (--sabr-dir, default $REF_ROOT/SABR). Default --train-eps 0.1 (SABR trains at the
              test eps).
  taps        TAPS's model.ckpt, the state dict of its abstract network.

Mapping rule (checked, not guessed): the reference state dict is grouped by module prefix, in
order; each group is classified by its tensors -- normalisation (mean + std/sigma), convolution
(4-d weight), batch norm (running_mean/running_var), linear (2-d weight), DeepZ slope of an
abstract ReLU (deepz_lambda, dropped: unused by the forward pass and by IBP) -- and the groups
must come out exactly as [norm?, conv, bn, conv, bn, linear] with our shapes; otherwise it stops.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict
from pathlib import Path

import torch

REPOSITORIES = {  # kind -> (GitHub repository, commit we used)
    "fast_ibp": ("shizhouxing/Fast-Certified-Robust-Training",
                 "557797bd2aba1647341c20a057b36c21d69a5642"),
    "expressive": ("alessandrodepalma/expressive-losses",
                   "3df64fa997e275605c331054499f36cc9f213187"),
    "sabr": ("eth-sri/SABR", "1a6c2582ec9fa2d81eacdd3c86f90732bb72f4e7"),
    "taps": ("eth-sri/TAPS", "6b5c5d9d3453c482f56f00e6f57b99b07b11ca4f"),
}
OUR_SLOTS = {"conv": ["1", "4"], "bn": ["2", "5"], "linear": ["8"]}
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _group_by_module(state):
    groups: OrderedDict[str, dict] = OrderedDict()
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        groups.setdefault(prefix, {})[name] = value
    return groups


def _kind(tensors):
    names = set(tensors)
    if names <= {"deepz_lambda"}:
        return "skip"
    if "running_mean" in names or "running_var" in names:
        return "bn"
    if "mean" in names and ("std" in names or "sigma" in names):
        return "norm"
    weight = tensors.get("weight")
    if weight is not None and weight.dim() == 4:
        return "conv"
    if weight is not None and weight.dim() == 2:
        return "linear"
    return "other"


def map_to_cnn3(state):
    """Reference state dict -> (our cnn3 state dict, mean, std)."""
    groups = _group_by_module(state)
    kinds = [(prefix, _kind(tensors)) for prefix, tensors in groups.items()]
    others = [prefix for prefix, kind in kinds if kind == "other"]
    if others:
        raise SystemExit(f"unrecognised tensors in the reference checkpoint: {others}")
    kinds = [(prefix, kind) for prefix, kind in kinds if kind != "skip"]
    norm = [prefix for prefix, kind in kinds if kind == "norm"]
    layers = [(prefix, kind) for prefix, kind in kinds if kind != "norm"]
    if [kind for _, kind in layers] != ["conv", "bn", "conv", "bn", "linear"] or len(norm) > 1:
        raise SystemExit(f"not a CNN3 (Conv-BN-ReLU x2, Linear): module kinds {kinds}")
    if norm:
        tensors = groups[norm[0]]
        mean = tensors["mean"].detach().float().flatten()
        std = tensors.get("std", tensors.get("sigma")).detach().float().flatten()
    else:  # the repository's own MNIST models see raw pixels
        mean, std = torch.tensor([0.0]), torch.tensor([1.0])
    out = OrderedDict([("0.mean", mean.clone()), ("0.std", std.clone())])
    used = {"conv": 0, "bn": 0, "linear": 0}
    for prefix, kind in layers:
        slot = OUR_SLOTS[kind][used[kind]]
        used[kind] += 1
        tensors = groups[prefix]
        for name in BN_KEYS if kind == "bn" else ("weight", "bias"):
            if name in tensors:
                out[f"{slot}.{name}"] = tensors[name].detach().clone()
            elif name == "num_batches_tracked":
                out[f"{slot}.{name}"] = torch.tensor(0, dtype=torch.long)
            else:
                raise SystemExit(f"{prefix}: {name} missing (keys {sorted(tensors)})")
        print(f"  {prefix + '.*':<28} -> {slot}.* ({kind})")
    return out, [float(v) for v in mean], [float(v) for v in std]


def _load_trusted(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickles of older torch versions need the full unpickler
        return torch.load(path, map_location="cpu", weights_only=False)


def read_reference(kind, path, sabr_dir):
    """-> (reference state dict, epoch or -1)."""
    if kind in ("fast_ibp", "expressive"):
        ckpt = _load_trusted(path)
        print(f"{path}: epoch {ckpt.get('epoch')}, best (err, rob_err, epoch) {ckpt.get('best')}")
        return ckpt["state_dict"], ckpt.get("epoch", -1)
    if kind == "sabr":
        sys.path.insert(0, str(sabr_dir))
        net = torch.load(path, map_location="cpu", weights_only=False)
        print(f"{path}: {type(net).__name__}, epoch {getattr(net, 'epoch', None)}")
        return net.state_dict(), getattr(net, "epoch", None) or -1
    return torch.load(path, map_location="cpu", weights_only=True), -1


def clean_accuracy(model, n=1000):
    from tightrope.train import load_test_split

    x, y = load_test_split("mnist")
    with torch.no_grad():
        return float((model(x[:n]).argmax(1) == y[:n]).float().mean())


def write(out, state, mean, std, *, kind, source, config_yaml, epoch, train_eps, test_eps):
    from tightrope.train import load_checkpoint, load_config
    from tightrope.train.checkpoint import CHECKPOINT_FORMAT, load_weights, save_checkpoint
    from tightrope.train.models import cnn3

    kwargs = {"in_channels": 1, "input_size": 28, "num_classes": 10, "mean": mean, "std": std}
    model = cnn3(**kwargs)
    load_weights(model, state, source="exported reference weights")  # strict: names + shapes
    repo, commit = REPOSITORIES[kind]
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": {"name": "cnn3", "kwargs": kwargs, "state_dict": model.eval().state_dict()},
        "dataset": {"name": "mnist", "input_shape": [1, 28, 28], "num_classes": 10,
                    "mean": mean, "std": std},
        "eps": {"train": float(train_eps), "test": float(test_eps)},
        "config": load_config(config_yaml).to_plain() if config_yaml else {},
        "epoch": int(epoch),
        "step": -1,
        "versions": {"reference_repo": repo, "reference_commit": commit,
                     "reference_checkpoint": str(source)},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, payload)
    torch.save(model.state_dict(), f"{out}.state_dict.pt")
    reloaded = load_checkpoint(out)
    print(f"wrote {out} (+ .state_dict.pt); reloads as {reloaded.model_name}, "
          f"clean accuracy on the first 1000 test images: {clean_accuracy(reloaded.model):.4f}")
    return reloaded.model


def compare_logits(model, logits_file):
    """Our model's logits against those launch/ref_logits.py wrote with the reference model on
    the same inputs: {'x': (N, 1, 28, 28) in [0, 1], 'logits': (N, 10)}."""
    ref = torch.load(logits_file, weights_only=True)
    with torch.no_grad():
        ours = model(ref["x"].float())
    diff = (ours - ref["logits"].float()).abs().max().item()
    print(f"max |logit difference| vs the reference model on {len(ref['x'])} inputs: {diff:.3e}")
    if diff > 1e-4:
        raise SystemExit("exported model does not reproduce the reference logits")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("kind", choices=sorted(REPOSITORIES))
    p.add_argument("checkpoint", help="the reference repository's saved weights")
    p.add_argument("--out", required=True, help="tightrope checkpoint to write (.pt)")
    p.add_argument("--config", default=None,
                   help="our matching recipe, stored as the checkpoint's config, e.g. "
                        "configs/mnist_cpu/eps0.1/ibp.yaml")
    p.add_argument("--train-eps", type=float, default=None,
                   help="recorded training eps (default 0.2; sabr: 0.1)")
    p.add_argument("--test-eps", type=float, default=0.1)
    p.add_argument("--sabr-dir", type=Path,
                   default=Path(os.environ.get("REF_ROOT", "/work/ref")) / "SABR",
                   help="SABR checkout, for unpickling (default $REF_ROOT/SABR)")
    p.add_argument("--compare-logits", default=None,
                   help="a {'x', 'logits'} file written by launch/ref_logits.py (smoke check)")
    args = p.parse_args()
    train_eps = args.train_eps
    if train_eps is None:
        train_eps = 0.1 if args.kind == "sabr" else 0.2
    state, epoch = read_reference(args.kind, args.checkpoint, args.sabr_dir)
    mapped, mean, std = map_to_cnn3(state)
    model = write(args.out, mapped, mean, std, kind=args.kind, source=args.checkpoint,
                  config_yaml=args.config, epoch=epoch, train_eps=train_eps,
                  test_eps=args.test_eps)
    if args.compare_logits:
        compare_logits(model, args.compare_logits)


if __name__ == "__main__":
    main()
