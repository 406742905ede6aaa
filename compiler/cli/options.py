"""Click options that several commands share, defined once so they are named and described the
same everywhere: ``--model``, ``--judge``, ``--device``, ``--force``."""

from __future__ import annotations

import functools

import click

JUDGE_HELP = ("Judge: a local CLIP model folder (transformers CLIPModel) or a toy-world judge folder; "
              "default: the toy world's judge for toy-world models.")


def judge_option(dest: str = "judge_dir"):
    """``--judge DIR`` (``--clip`` kept as a hidden alias, verify's old name)."""

    def decorate(command):
        @functools.wraps(command)
        def merged(*args, **kwargs):
            alias = kwargs.pop("_clip_alias", None)
            if kwargs.get(dest) is None:
                kwargs[dest] = alias
            return command(*args, **kwargs)

        merged = click.option("--clip", "_clip_alias", default=None, type=click.Path(), hidden=True)(merged)
        return click.option("--judge", dest, default=None, type=click.Path(), help=JUDGE_HELP)(merged)

    return decorate


def device_option(command):
    return click.option("--device", default=None,
                        help="torch device (default: cuda when available, else cpu).")(command)


def force_option(what: str = "an existing output"):
    return click.option("--force", is_flag=True, help=f"Replace {what}.")


def model_option(default: str | None = "toy", help_text: str = "Model: a diffusers folder, a single file, "
                 "a Hugging Face cache folder or repo id, or 'toy' (the embedded toy model)."):
    return click.option("--model", "model_path", default=default, show_default=default is not None,
                        help=help_text)
