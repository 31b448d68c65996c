# PLACEHOLDER
class GaussianNLLLoss: pass
