# PLACEHOLDER
class SpreadDivergenceLoss: pass
