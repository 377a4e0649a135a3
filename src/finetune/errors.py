"""One exception family for failures a user can act on; the exit code lives on the class.

0 ok · 1 internal bug · 2 usage · 3 dataset · 4 model file · 5 resources · 6 diverged · 128+N signal N.
"""


class FinetuneError(Exception):
    """A failure the user can act on: the message names the file or option and the fix."""

    exit_code = 1
    # Set by distributed.echoed() when every process raises the same error together: rank 0 prints it
    # (`echo` is True in the others, which stay silent) and all ranks leave together (`collective`).
    collective = False
    echo = False


class UsageError(FinetuneError):
    """A bad option or argument (the one way options are refused)."""

    exit_code = 2


class DatasetError(FinetuneError):
    exit_code = 3


class ModelFileError(FinetuneError):
    exit_code = 4


class ResourceError(FinetuneError):
    """Disk, memory, a lock held by another run, or the network for weights."""

    exit_code = 5


class DivergedError(FinetuneError):
    exit_code = 6


class Interrupted(FinetuneError):
    """Stopped on request (SIGINT/SIGTERM) after a step; the run folder holds a resumable state."""

    def __init__(self, signum: int, run_dir=None):
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.run_dir = signum, run_dir
        self.exit_code = 128 + signum


EXIT_CODES = {0: "ok", 1: "internal error (a bug: please report it)", UsageError.exit_code: "usage: a bad option",
              DatasetError.exit_code: "dataset invalid", ModelFileError.exit_code: "model file invalid, unsafe or "
              "incompatible", ResourceError.exit_code: "resources: disk, memory, a busy run folder, network for "
              "weights", DivergedError.exit_code: "training diverged (loss NaN/inf)", 130: "SIGINT (Ctrl-C)",
              143: "SIGTERM"}
