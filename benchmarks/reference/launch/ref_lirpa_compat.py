"""Name compatibility between the reference code and auto_LiRPA 0.7.1 (the current release, the
one that runs beside torch 2.13): the Shi et al. regulariser (regularization.compute_reg, in
both Fast-Certified-Robust-Training and expressive-losses) reads the model's input node as
``model._modules['/input-1']`` (Fast-Certified-Robust-Training, auto_LiRPA of 2025) or
``model._modules['/input.1']`` (expressive-losses, auto_LiRPA of 2023/24). auto_LiRPA names
that node after the traced graph's input, which here is ``/0`` (our CNN3 starts with a
Normalize layer). We make both old names resolve to the real input node, by lookup only
(a dict subclass with __missing__: iteration over the nodes is unchanged, nothing is
duplicated, no bound computation changes)."""
import auto_LiRPA.bound_general as _bg

ALIASES = ("/input-1", "/input.1")


class _AliasDict(dict):
    def __init__(self, data, real):
        super().__init__(data)
        self._real = real

    def __missing__(self, key):
        if key in ALIASES:
            return dict.__getitem__(self, self._real)
        raise KeyError(key)


_orig_init = _bg.BoundedModule.__init__


def _init(self, *args, **kwargs):
    _orig_init(self, *args, **kwargs)
    names = [n for n, node in self._modules.items() if type(node).__name__ == "BoundInput"]
    if len(names) == 1 and names[0] not in ALIASES:
        self.__dict__["_modules"] = _AliasDict(self._modules, names[0])


def install():
    _bg.BoundedModule.__init__ = _init
