def lp_bound(*a, **k): raise NotImplementedError
def milp_bound(*a, **k): raise NotImplementedError
