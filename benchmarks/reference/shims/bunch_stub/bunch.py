"""Stand-in for the `bunch` package (its 1.0.1 sdist does not build on Python 3.11:
open(..., 'rU')). SABR uses only Bunch(**kwargs) with attribute access, for its final MN-BaB
conversion."""


class Bunch(dict):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__ = self
