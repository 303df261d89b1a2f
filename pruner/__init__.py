"""pruner: influence-based pruning of image-text datasets for CLIP pretraining, on Ray."""
__version__ = "0.1.0"
