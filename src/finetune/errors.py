"""The exit-code contract: one exception class per expected outcome other than success, its exit code on the
class; EXIT_CODES (below) is the one table of them, which README's "Exit codes" and the tests read.

0 ok · 1 internal error (a bug) · 2 usage · 3 dataset or inputs · 4 model file · 5 resources · 6 diverged ·
7 a result that failed its check · 8 nothing to do · 128+N signal N.
"""


class FinetuneError(Exception):
    """The base of the failures a user can act on: the message names the file or option and the fix.

    Raise a subclass: its exit code says which kind of outcome this is. The base's own code is 1, an internal
    error, so that only a bug (or an error relayed from another process, with its code) exits 1.
    """

    exit_code = 1
    meaning = "internal error (a bug: please report it; --debug shows the traceback)"
    # Set by distributed.echoed() when every process raises the same error together: rank 0 prints it
    # (`echo` is True in the others, which stay silent) and all ranks leave together (`collective`).
    collective = False
    echo = False


class UsageError(FinetuneError):
    """A bad option or argument (the one way options are refused)."""

    exit_code = 2
    meaning = "usage: a bad option or argument, a missing extra, an -o folder that holds files"


class DatasetError(FinetuneError):
    """The dataset, or the images given to a command, cannot be used."""

    exit_code = 3
    meaning = "dataset or input images invalid"


class ModelFileError(FinetuneError):
    """A model or weights file that is invalid, unsafe or incompatible."""

    exit_code = 4
    meaning = "model or weights file invalid, unsafe or incompatible"


class ResourceError(FinetuneError):
    """Disk, memory, a lock held by another run, or the network for weights."""

    exit_code = 5
    meaning = "resources: disk, memory, a busy run folder, a data-loading worker killed, network for weights"


class DivergedError(FinetuneError):
    """Training stopped on a non-finite loss."""

    exit_code = 6
    meaning = "training diverged (loss NaN/inf)"


class CheckFailedError(FinetuneError):
    """A result refused by its own check, so nothing was written: an export that disagrees with PyTorch, an int8
    model below the accuracy margin."""

    exit_code = 7
    meaning = ("result refused: it failed its check (an export disagreeing with PyTorch, int8 below the accuracy "
               "margin); nothing written")


class NothingToDoError(FinetuneError):
    """The inputs are fine but leave nothing to do (suggest: every photo of the pool is labelled, waiting or a
    near-duplicate of a labelled one)."""

    exit_code = 8
    meaning = "nothing to do: suggest found no photo left to suggest"


class Interrupted(FinetuneError):
    """Stopped on request (SIGINT/SIGTERM) after a step; the run folder holds a resumable state."""

    def __init__(self, signum: int, run_dir=None):
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.run_dir = signum, run_dir
        self.exit_code = 128 + signum


# Every exit code finetune's command line uses, and what it means.
EXIT_CODES = {0: "ok", **{e.exit_code: e.meaning for e in (FinetuneError, UsageError, DatasetError, ModelFileError,
                                                            ResourceError, DivergedError, CheckFailedError,
                                                            NothingToDoError)},
              130: "interrupted by SIGINT (Ctrl-C)", 143: "interrupted by SIGTERM"}
