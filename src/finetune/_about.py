"""The package's version and the moment it was imported: a leaf that every layer may read (it imports nothing of
finetune), so that no module has to reach up to the package root for them."""

import time

__version__ = "0.1.0"
STARTED = time.monotonic()  # when finetune was first imported (for the command line: when the command started)
