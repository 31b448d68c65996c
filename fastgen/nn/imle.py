# PLACEHOLDER
class IMLELoss: pass
