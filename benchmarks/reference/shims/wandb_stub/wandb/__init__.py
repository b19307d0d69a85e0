"""No-op stand-in for wandb (Shi et al.'s train.py calls wandb.init/log/finish unconditionally;
expressive-losses imports it). Nothing is logged anywhere."""
__version__ = "0.0-ref-stub"


class _Summary(dict):
    pass


class _Run:
    def __init__(self):
        self.summary = _Summary()

    def log(self, *args, **kwargs):
        pass

    def finish(self, *args, **kwargs):
        pass


run = None


def init(*args, **kwargs):
    global run
    run = _Run()
    return run


def log(*args, **kwargs):
    pass


def finish(*args, **kwargs):
    pass
