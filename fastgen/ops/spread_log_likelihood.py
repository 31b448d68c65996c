# PLACEHOLDER: being written; replaced before anything lands.
def spread_log_likelihood(*args, **kwargs):
    raise NotImplementedError("spread_log_likelihood")
