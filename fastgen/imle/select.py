# PLACEHOLDER
def select_latents(*a, **k): raise NotImplementedError
