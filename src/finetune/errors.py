"""The one exception type the library raises for user-facing failures, with stable exit codes."""

# Exit codes users and scripts can rely on (documented in README).
EXIT_USAGE = 2
EXIT_DATASET = 3
EXIT_MODEL_FILE = 4
EXIT_RESOURCE = 5
EXIT_DIVERGED = 6


class FinetuneError(Exception):
    """A failure the user can act on: the message names the file or option and the fix."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class DatasetError(FinetuneError):
    exit_code = EXIT_DATASET


class ModelFileError(FinetuneError):
    exit_code = EXIT_MODEL_FILE


class ResourceError(FinetuneError):
    exit_code = EXIT_RESOURCE


class DivergedError(FinetuneError):
    exit_code = EXIT_DIVERGED
