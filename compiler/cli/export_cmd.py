"""``editc export <format>`` and ``editc apply``: other formats of a model.

    editc export onnx MODEL --out DIR [--fp16] [--force]
    editc export single-file MODEL --out FILE.safetensors [--force]
    editc apply DELTA --to CHECKPOINT --out PATH [--force]

The ``export`` subcommands come from the format registry (``compiler.export.formats``): each
format that names a ``command`` contributes ``editc export <name>``, defined in its own module
and imported only when listed or run. MODEL is 'toy', a diffusers folder (for instance one
``editc compile`` wrote) or a single file. Every output is written atomically and never
replaces an existing path without ``--force``.
"""

from __future__ import annotations

import json
import time

import click

from compiler.cli import main


def _echo_json(document: dict) -> None:
    click.echo(json.dumps(document, indent=2, default=str))


class _FormatCommands(click.Group):
    """The registry's formats that have a command, as subcommands."""

    def list_commands(self, ctx) -> list[str]:
        from compiler.export.formats import FORMATS

        return [name for name, fmt in FORMATS.items() if fmt.command]

    def get_command(self, ctx, name: str):
        from compiler.export.formats import FORMATS

        fmt = FORMATS.get(name)
        return fmt.cli_command() if fmt is not None else None


@main.group("export", cls=_FormatCommands)
def export_group() -> None:
    """Export a model in another format (one subcommand per registered format)."""


@main.command("apply")
@click.argument("delta", type=click.Path(dir_okay=False))
@click.option("--to", "checkpoint", required=True,
              help="The checkpoint to apply DELTA to: a diffusers folder, a single file or 'toy'.")
@click.option("--out", "out_path", required=True, type=click.Path(),
              help="Output: a folder for a diffusers checkpoint, a .safetensors file for a single file.")
@click.option("--force", is_flag=True, help="Apply even if CHECKPOINT is not the delta's base; "
              "replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def apply_command(delta, checkpoint, out_path, force, as_json):
    """Apply an editc DELTA file to CHECKPOINT, writing the edited model to --out.

    Refuses a checkpoint that is not the delta's base (another hash and other values of the
    edited tensors) unless --force; the checkpoint itself is never modified.
    """
    from compiler.export.delta import apply_delta
    from compiler.io import claim_output, input_paths

    started = time.perf_counter()
    with claim_output(out_path, force=force, inputs=input_paths(delta, checkpoint), kind="any"):
        result = apply_delta(delta, checkpoint, out_path, force=force)
    seconds = time.perf_counter() - started
    how = {"hash": "base hash matches", "tensors": "same base weights in the other layout",
           "forced": "NOT the delta's base: applied because of --force"}[result.base_match]
    if as_json:
        _echo_json({"out": str(result.out), "base_match": result.base_match, "tensors": result.tensors,
                    "seconds": seconds})
    else:
        click.echo(f"applied {result.tensors} tensors to {checkpoint} ({how}): wrote {result.out} "
                   f"in {seconds:.1f} s")
