"""Registers our CNN3 in TAPS's ``PARC_networks.get_network`` as ``cnn_3layer_bn``.

TAPS has ``cnn_3layer``: Normalization(0.1307, 0.3081) -> Conv(16,5,s2,p2)-ReLU ->
Conv(32,4,s2,p1)-ReLU -> Flatten -> Linear(10). Our CNN3 is that network with a BatchNorm after
each convolution. We let TAPS build ``cnn_3layer`` (its normalisation, layers and default
initialisation), insert the two BatchNorm layers (which draw no random numbers, so the same seed
gives the same weights), then apply TAPS's own initialisation (``--init fast``: ibp_fast_init).
"""
import PARC_networks
from torch import nn

_get_network = PARC_networks.get_network


def _no_init(model):
    return model


_INITS = {"default": _no_init, "fast": PARC_networks.ibp_fast_init,
          "ZerO": PARC_networks.ZerO_init}


def get_network(model_name: str, dataset: str, device, init="default"):
    if model_name != "cnn_3layer_bn":
        return _get_network(model_name, dataset, device, init)
    if dataset.lower() != "mnist":
        raise ValueError(f"cnn_3layer_bn is registered for MNIST only, not {dataset!r}")
    if init not in _INITS:
        raise NotImplementedError(f"Unknown initialization method: {init}")
    normalize, conv1, relu1, conv2, relu2, flatten, linear = _get_network(
        "cnn_3layer", dataset, device, init="default")
    model = nn.Sequential(normalize, conv1, nn.BatchNorm2d(conv1.out_channels), relu1,
                          conv2, nn.BatchNorm2d(conv2.out_channels), relu2, flatten, linear)
    model = model.to(device)
    _INITS[init](model)
    return model


PARC_networks.get_network = get_network
