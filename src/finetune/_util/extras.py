"""Optional libraries behind pip extras: imported when a feature needs them, or a one-line UsageError naming
the extra to install."""

from __future__ import annotations

import importlib

from finetune.errors import UsageError


def require(module: str, extra: str, feature: str):
    """The module, imported; if missing, UsageError: `feature needs the EXTRA extra: pip install ...`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or module
        raise UsageError(f"{feature} needs the {extra} extra ({missing} is not installed): "
                         f"pip install 'finetune[{extra}]'") from None
