"""Training and evaluation of the detector and of SCAN. Nothing under models/ or app/ imports this."""
