"""finetune: turn a folder of photos into a working image classifier.

The Python API (finetune.api): train, load, evaluate, export, check, lr_find, tune, serve; Run (run.model),
CrossValidation, Model (predict, evaluate, export, explain, suggest), EvalResult, CheckResult, Prediction, Failure;
Observer (finetune.events) for progress. Imported on first use, so that `import finetune` and
the command line's start stay fast.
"""

import importlib

from finetune._about import __version__
from finetune._util.privacy import keep_telemetry_off

keep_telemetry_off()  # before any library finetune drives is imported: nothing leaves the machine unasked

_API = ("train", "load", "evaluate", "export", "check", "lr_find", "tune", "serve", "Run", "CrossValidation", "Model",
        "EvalResult", "CheckResult", "Prediction", "Failure", "Observer")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:  # the API's modules load on first use, as the heavy libraries do
        return getattr(importlib.import_module("finetune.api"), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
