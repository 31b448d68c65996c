# PLACEHOLDER: being written; replaced before anything lands.
def imle_loss(*args, **kwargs):
    raise NotImplementedError("imle_loss")
