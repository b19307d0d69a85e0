"""CNN3 of our recipe (tightrope.train.models.cnn3, MNIST) as a plain torch nn.Sequential, for the
auto_LiRPA-based reference repositories (Shi et al.'s Fast-Certified-Robust-Training and
expressive-losses), whose model is built by name with ``eval(args.model)(in_ch=, in_dim=)``.

Layer order and parameter/buffer names are identical to ours, so the saved state_dict loads into
tightrope's cnn3 unchanged:
  0 Normalize(mean, std)  buffers 0.mean (1,), 0.std (1,)
  1 Conv2d(1, 16, 5, stride 2, padding 2)   2 BatchNorm2d(16)   3 ReLU
  4 Conv2d(16, 32, 4, stride 2, padding 1)  5 BatchNorm2d(32)   6 ReLU
  7 Flatten   8 Linear(32*7*7, 10)
"""
import torch
from torch import nn

MNIST_MEAN = 0.1307  # tightrope.train.data.DATASET_INFO[MNIST]
MNIST_STD = 0.3081


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).flatten())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).flatten())

    def forward(self, x):
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


def cnn3(in_ch=1, in_dim=28, width=16, num_class=10, mean=MNIST_MEAN, std=MNIST_STD):
    if in_dim % 4:
        raise ValueError(f"in_dim must be a multiple of 4 (two stride-2 convs), not {in_dim}")
    return nn.Sequential(
        Normalize([mean] * in_ch if in_ch > 1 and not isinstance(mean, (list, tuple)) else mean,
                  [std] * in_ch if in_ch > 1 and not isinstance(std, (list, tuple)) else std),
        nn.Conv2d(in_ch, width, 5, stride=2, padding=2), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * (in_dim // 4) ** 2, num_class),
    )


def cnn3_nonorm(in_ch=1, in_dim=28, width=16, num_class=10):
    """The same without input normalisation (mean 0, std 1: what these repositories use for
    MNIST with their own models). Exported with mean 0 / std 1 buffers."""
    return cnn3(in_ch, in_dim, width, num_class, mean=0.0, std=1.0)


def register(*modules):
    """Make ``cnn3``/``cnn3_nonorm`` resolvable by ``eval(args.model)`` in the given modules."""
    for m in modules:
        m.cnn3 = cnn3
        m.cnn3_nonorm = cnn3_nonorm
