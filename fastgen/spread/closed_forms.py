# PLACEHOLDER
def kl_two_deltas(*a, **k): raise NotImplementedError
def kl_gaussians(*a, **k): raise NotImplementedError
