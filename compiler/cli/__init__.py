"""The ``editc`` command line: a thin layer over the pipeline stages.

Each sub-command lives in its own module of this package and only parses arguments, calls a
stage and prints. User mistakes (``UserError``) become one line on stderr and exit code 2.
"""

from __future__ import annotations


import click

from compiler import __version__
from compiler.errors import GateFailed, UserError

# Nothing may ever be downloaded from a model hub: ``compiler.OFFLINE_ENV``, set on import.


# The exit-code contract (README "Exit codes"): what a release pipeline branches on.
PASSED = 0        # the command did its work; every verify gate passed
GATE_FAILED = 1   # verify ran and a gate failed (GateFailed)
BAD_INPUT = 2     # bad input: one line on stderr naming the file or field and the fix
BUG = 3           # anything else is a bug in editc (traceback, then one line)
INTERRUPTED = 130


class EditcGroup(click.Group):
    """A click group that holds editc's exit-code contract (README "Exit codes"): ``UserError``,
    a usage error of any sub-command, and a disk-full or permission ``OSError`` anywhere exit 2
    with one line, no traceback; ``GateFailed`` exits 1; any other exception is a bug: its
    traceback, one line, exit 3 (never 1, which a pipeline reads as a failed gate)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"editc: error: {err}", err=True)
            ctx.exit(BAD_INPUT)
        except click.UsageError as err:  # a missing or malformed argument: one line too, not click's three
            where = err.ctx.command_path if err.ctx is not None else ctx.command_path
            message = " ".join(err.format_message().split()).rstrip(".")
            click.echo(f"editc: error: {where}: {message}; see '{where} --help'", err=True)
            ctx.exit(BAD_INPUT)
        except GateFailed as err:
            if str(err):
                click.echo(f"editc: verify failed: {err}", err=True)
            ctx.exit(GATE_FAILED)
        except OSError as err:
            from compiler.io.atomic import disk_error

            friendly = disk_error(err, err.filename or "editc")
            if friendly is None:
                self._bug(ctx, err)
            click.echo(f"editc: error: {friendly}", err=True)
            ctx.exit(BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("editc: interrupted", err=True)
            ctx.exit(INTERRUPTED)
        except click.ClickException as err:  # e.g. click.FileError: bad input, one line
            click.echo(f"editc: error: {' '.join(err.format_message().split())}", err=True)
            ctx.exit(BAD_INPUT)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as err:  # noqa: BLE001 - anything else is a bug: never exit 1 (a failed gate)
            self._bug(ctx, err)

    @staticmethod
    def _bug(ctx: click.Context, err: BaseException):
        import traceback

        traceback.print_exception(err)
        click.echo(f"editc: internal error (a bug, exit {BUG}): {err.__class__.__name__}: "
                   f"{' '.join(str(err).split())[:300]}; please report it with the traceback above", err=True)
        ctx.exit(BUG)


@click.group(cls=EditcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="editc")
def main() -> None:
    """editc: compile knowledge edits into text-to-image diffusion checkpoints.

    A recipe says what to remove or update; `editc compile` locates the layers that hold it,
    solves closed-form ridge regressions for new weights, writes the edited checkpoint and
    verifies it. The default model is the embedded toy world (`--model toy`).
    """


# Sub-commands register themselves on `main`; one module per command. Imported last, since
# each one imports `main` from here.
from compiler.cli import (  # noqa: E402,F401
    bench_cmd,
    compile_cmd,
    export_cmd,
    generate_cmd,
    inspect_cmd,
    locate_cmd,
    recipe_cmd,
    trace_cmd,
    verify_cmd,
)
