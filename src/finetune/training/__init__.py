"""Training: setup (data, model, trainer), epochs, the loop, what a run writes, sanity checks, folds,
feature extraction and resuming. run_training is the entry point for one run."""

from finetune.training.loop import Run, run_training

__all__ = ["Run", "run_training"]
