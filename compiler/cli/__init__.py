"""The ``editc`` command line: a thin layer over the pipeline stages.

Each sub-command lives in its own module of this package and only parses arguments, calls a
stage and prints. User mistakes (``UserError``) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import os

import click

from compiler import __version__
from compiler.errors import GateFailed, UserError

# Nothing may ever be downloaded from a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


class EditcGroup(click.Group):
    """A click group that turns ``UserError`` (and a disk-full or permission ``OSError``
    anywhere) into exit 2 with one line, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"editc: error: {err}", err=True)
            ctx.exit(2)
        except GateFailed as err:
            if str(err):
                click.echo(f"editc: verify failed: {err}", err=True)
            ctx.exit(1)
        except OSError as err:
            from compiler.io.atomic import disk_error

            friendly = disk_error(err, err.filename or "editc")
            if friendly is None:
                raise
            click.echo(f"editc: error: {friendly}", err=True)
            ctx.exit(2)


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
