"""finetune: turn a folder of photos into a working image classifier."""

__version__ = "0.1.0"
