"""finetune's command line: the only package that prints (Rich, stdout for results, stderr for the rest).

Data flows one way: options -> a frozen TrainConfig -> the library -> events and results -> rendered here.
torch is never imported at module level anywhere in finetune (only inside the functions that run models),
so `finetune --help` and importing this package stay fast.
"""

from finetune.cli import infer, serve, suggest, tools, train  # noqa: F401 - registers the commands
from finetune.cli.app import app, in_order

in_order(app)  # help lists the commands in the order a user meets them


def main() -> None:
    """Entry point for `python -m finetune`."""
    app(prog_name="finetune")


__all__ = ["app", "main"]
