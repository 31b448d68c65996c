# PLACEHOLDER: being written; replaced before anything lands.
def spread_noise(*args, **kwargs):
    raise NotImplementedError("spread_noise")
