# PLACEHOLDER: being written; replaced before anything lands.
def gaussian_nll_loss(*args, **kwargs):
    raise NotImplementedError("gaussian_nll_loss")
