"""The shared code of the pruning book: pruning, surgery, data, models, training, measurement."""
__version__ = "0.1.0"
