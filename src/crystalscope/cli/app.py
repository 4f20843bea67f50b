"""The Typer application: its command groups, global options, and the entry point that turns
errors into one line and an exit code (2: a usage or input mistake, 1: the work failed; the
traceback only with ``--debug`` or CRYSTALSCOPE_DEBUG=1)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.markup import escape
from typer.core import TyperGroup

from crystalscope import __version__
from crystalscope.console import err, out
from crystalscope.errors import CrystalscopeError
from crystalscope.extras import missing_extra_message
from crystalscope.settings import SettingsError


class DefaultCommandGroup(TyperGroup):
    """A group whose first command is also its short form: arguments that name none of its
    commands go to ``default_command``."""

    default_command = ""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


class SynthGroup(DefaultCommandGroup):
    """``synth OUT …`` is short for ``synth crops OUT …``; ``synth batch`` and ``synth unknown``
    are the group's other commands."""

    default_command = "crops"


class LabelGroup(DefaultCommandGroup):
    """``label IMAGES …`` is short for ``label start IMAGES …``; ``label export`` and
    ``label import`` trade labels with Label Studio."""

    default_command = "start"


HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="crystalscope",
    help="Classify in-situ crystallization images: synthesize, check and split data; train, "
         "evaluate, export and serve models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings=HELP_OPTIONS,
)
data_app = typer.Typer(help="Inspect and fetch data sets.", no_args_is_help=True,
                       context_settings=HELP_OPTIONS)
app.add_typer(data_app, name="data")
synth_app = typer.Typer(
    cls=SynthGroup, no_args_is_help=True, context_settings=HELP_OPTIONS,
    help="Synthetic data: probe crops (synth OUT, short for synth crops OUT), images that are "
         "neither class (synth unknown OUT), a simulated batch over time (synth batch OUT).",
    epilog="Example: crystalscope synth data/synthetic --per-class 500 --seed 7   "
           "(or: crystalscope synth unknown unknown-images/; crystalscope synth batch batches/)")
app.add_typer(synth_app, name="synth")
label_app = typer.Typer(
    cls=LabelGroup, no_args_is_help=True, context_settings=HELP_OPTIONS,
    help="Label crops in a local page (label IMAGES, short for label start IMAGES); trade "
         "labels with Label Studio (label export, label import).",
    epilog="Example: crystalscope label new-crops/ --out labelled/ --classes cex,pg   (or: "
           "crystalscope label export new-crops/ --out labelled/ --classes cex,pg "
           "--output tasks.json)")
app.add_typer(label_app, name="label")

_state = {"debug": os.environ.get("CRYSTALSCOPE_DEBUG") == "1"}


def _version(value: bool) -> None:
    if value:
        out.print(f"crystalscope {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    if debug:
        _state["debug"] = True


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, prog_name="crystalscope", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors (click's, vendored by Typer): exit 2
        context = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" or not hasattr(exc, "format_message"):
            exc.show()  # a bare group: its help
        else:  # one line, as every other mistake
            hint = f" (see {context.command_path} -h)" if context is not None else ""
            err.print(f"[red]error:[/red] {escape(exc.format_message())}{escape(hint)}",
                      highlight=False)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except CrystalscopeError as exc:
        if _state["debug"]:
            raise
        message = exc.for_flags() if isinstance(exc, SettingsError) else str(exc)
        err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
        sys.exit(exc.exit_code)
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if _state["debug"] or message is None:
            _unexpected(exc)
        err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
        sys.exit(2)
    except Exception as exc:
        _unexpected(exc)
    sys.exit(result if isinstance(result, int) else 0)


def _unexpected(exc: Exception) -> None:
    """A bug or an unforeseen failure: one line with its type, or the traceback with --debug."""
    if _state["debug"]:
        raise exc
    err.print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))} "
              "(run with --debug for the traceback)", highlight=False)
    sys.exit(1)
