"""Logits of a reference model on the first N images of an MNIST IDX split, computed with the
reference repository's own model code in its own venv; ``export.py --compare-logits`` checks the
exported tightrope model against them. Run from the reference checkout's directory, as the
launchers (SABR and TAPS import their model code from there):

  cd $REF_ROOT/TAPS
  $REF_ROOT/venvs/TAPS/bin/python $TIGHTROPE/benchmarks/reference/launch/ref_logits.py \\
      taps CHECKPOINT OUT.pt [--root DIR] [--n N]

``--root`` defaults to ``data`` (the checkout's link to our validation split: its first 512
images are the smoke split's validation images).
"""
import argparse
import os
import sys

import torch

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("kind", choices=["fast_ibp", "expressive", "sabr", "taps"])
p.add_argument("checkpoint")
p.add_argument("out")
p.add_argument("--root", default="data", help="folder holding MNIST/raw/t10k-*-ubyte")
p.add_argument("--n", type=int, default=512)
a = p.parse_args()
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.getcwd())

from torchvision import datasets  # noqa: E402  (the shim, on the path through a .pth file)

ds = datasets.MNIST(a.root, train=False)
x = ds.data[: a.n].float().div(255).unsqueeze(1)

if a.kind in ("fast_ibp", "expressive"):
    import ref_cnn3

    net = ref_cnn3.cnn3()
    state = torch.load(a.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict(state)
elif a.kind == "sabr":
    if not os.path.isdir("src/AIDomains"):
        sys.exit("run this from the SABR checkout (unpickling needs src.AIDomains)")
    net = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
else:  # taps: rebuild the network as mix_train.py does, then load model.ckpt
    import launch_taps_net  # noqa: F401  (registers cnn_3layer_bn)
    import PARC_networks
    from AIDomains.abstract_layers import Sequential

    net = PARC_networks.get_network("cnn_3layer_bn", "mnist", "cpu", init="default")
    net = Sequential.from_concrete_network(net, (1, 28, 28), disconnect=True)
    net.load_state_dict(torch.load(a.checkpoint, map_location="cpu", weights_only=True))
net.eval()
with torch.no_grad():
    logits = net(x)
torch.save({"x": x, "logits": logits}, a.out)
accuracy = (logits.argmax(1) == ds.targets[: a.n]).float().mean()
print(f"wrote {a.out}: logits of {len(x)} images, accuracy {accuracy:.4f}")
