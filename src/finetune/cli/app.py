"""The Typer app and its error boundary: one red line and a stable exit code for every failure, signals
(a first Ctrl-C/SIGTERM stops cleanly, a second at once), and Python warnings kept out of the way."""

from __future__ import annotations

import functools
import signal
import warnings
from collections.abc import Callable

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption

from finetune._about import __version__
from finetune._util.ddp import from_env, leave_together
from finetune.cli.render import err, esc, out
from finetune.config import spelled_as
from finetune.errors import FinetuneError, Interrupted, ResourceError

state: dict = {"debug": False, "soft_stop": None}


_typer_display_type = TyperOption.display_type_rich


def _display_type(option: TyperOption, ctx) -> str | None:
    """Help shows an option's metavar (PATH, N) rather than Typer's <str>/<list[str]>, and nothing for flags."""
    if option.is_flag:
        return None
    return option.metavar or _typer_display_type(option, ctx)


TyperOption.display_type_rich = _display_type


class Command(TyperCommand):
    """finetune's help: arguments by their metavar (DATA, not Typer's {data} <str>)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for p in self.params:
            if isinstance(p, TyperArgument):
                shown = p.display_name_raw + ("..." if p.nargs != 1 else "")
                shown = shown if p.required else f"[{shown}]"
                p.get_usage_pieces = lambda ctx, shown=shown: [shown]
                p.display_type_rich = lambda ctx: None


app = typer.Typer(name="finetune", help="Turn a folder of photos into a working image classifier: train, predict, "
                  "export.", no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        out.print(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and "
                                 "exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and Python warnings on errors."),
) -> None:
    state["debug"] = debug
    ctx.with_resource(spelled_as("option"))  # the library's messages name settings as options (--batch-size)
    ctx.call_on_close(_install_signal_handlers())
    ctx.with_resource(warnings.catch_warnings())  # the filters are restored when the command ends
    if not debug:  # library warnings (Pillow, torch) are not the user's business; finetune says what matters
        warnings.simplefilter("ignore")


def _install_signal_handlers() -> Callable[[], None]:
    """First SIGINT/SIGTERM: training stops after its step (state["soft_stop"]); other commands stop now.
    The handlers then fall back to the default action, so a second signal ends the process at once, even
    inside a blocking call. Returns what restores the previous handlers."""

    def handler(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        if state["soft_stop"] is not None:
            state["soft_stop"](signum)
            return
        raise Interrupted(signum)

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (an embedding program): leave signals alone
        return lambda: None

    def restore() -> None:
        state["soft_stop"] = None
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def handle_errors(fn):
    """One red line and a stable exit code for user-facing failures; a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(e.exit_code) from None
        except FinetuneError as e:
            _print_error(e)
            if e.collective:
                leave_together()
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except MemoryError:
            _print_error(ResourceError("out of memory; use a smaller --batch-size or fewer workers (-j)"))
            raise typer.Exit(ResourceError.exit_code) from None
        except Exception as e:  # a bug, or a failure no message was written for: one line, not a traceback
            if state["debug"]:
                raise
            _unexpected(e)

    return wrapper


def _print_error(e: FinetuneError) -> None:
    if e.echo:  # raised by every process of a distributed run: rank 0 prints it
        return
    if state["debug"]:
        err.print_exception()
    try:
        world = from_env()
        rank = f"rank {world.rank}: " if world.distributed and not world.main else ""
    except FinetuneError:  # a malformed environment: its own error says so
        rank = ""
    err.print(f"[bold red]error:[/] {rank}{esc(str(e))}", highlight=False)


def _unexpected(e: Exception):
    first = esc(str(e).splitlines()[0][:200]) if str(e) else ""
    if "DataLoader worker" in str(e) or "Bus error" in str(e):
        err.print(f"[bold red]error:[/] a data-loading worker died ({first[:120]}); host memory or /dev/shm ran "
                  "out: use fewer workers (-j 0)", highlight=False)
        raise typer.Exit(ResourceError.exit_code) from None
    err.print(f"[bold red]internal error:[/] {type(e).__name__}: {first} (please report it; --debug shows the "
              "traceback)", highlight=False)
    raise typer.Exit(1) from None


# The order a user meets the commands in: train, then use the model; the dataset tools and searches after.
ORDER = ("train", "predict", "evaluate", "export", "serve", "check", "suggest", "lr-find", "tune")


def in_order(typer_app) -> None:
    """Sort the registered commands as ORDER (help lists them so); any other command goes last."""
    def name(c) -> str:
        return c.name or c.callback.__name__.replace("_", "-")

    typer_app.registered_commands.sort(key=lambda c: ORDER.index(name(c)) if name(c) in ORDER else len(ORDER))


def command(name: str | None = None, **kwargs):
    """app.command with finetune's help rendering and error boundary."""
    def register(f):
        return app.command(name, cls=Command, **kwargs)(handle_errors(f))

    return register
