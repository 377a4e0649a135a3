"""finetune: turn a folder of photos into a working image classifier."""

import time

__version__ = "0.1.0"
STARTED = time.monotonic()  # when finetune was imported (for the command line: when the command started)
