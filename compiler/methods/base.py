"""The protocol every edit method implements, and what methods share.

A method is one module with one :class:`EditMethod` subclass and one line in
:mod:`compiler.methods` (the registry). Recipe validation, the CLI, compile and bench read the
registry; nothing else names a method. What a method provides:

- ``name``, ``title``, ``summary`` (one line for ``--help`` and the README), ``edits_unet_layers`` (whether
  it needs located UNet cross-attention layers; ``False`` for text-encoder methods, where a
  recipe's ``layers`` is refused with ``layers_refusal``);
- ``fields``: the recipe keys only this method reads (:class:`MethodField`), each with its own
  parser; a value lands on the :class:`~compiler.recipe.Edit` attribute of that name when there
  is one, else in ``edit.options``;
- ``auto_choice(edit, family)``: whether ``method: auto`` should pick it, with the site and why;
- ``site(edit)`` and ``default_eos(site)``: its sub-choices and end-of-text default;
- ``build_rows(context, plans)`` then ``solve(context, plans, rows)``: the compile work for all
  edits of the recipe that use the method, giving new tensors by qualified name plus a manifest
  entry per solve (:class:`Solved`);
- ``describe(plan)``: extra manifest fields of one planned edit; ``bench_variants()``: what
  ``editc bench`` runs; ``where(edit)`` and
  ``edit_details(edit)``: its words in ``editc recipe check``'s summary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from compiler.methods.rows import RowContext
    from compiler.plan import PlannedEdit
    from compiler.recipe import Edit


@dataclass(frozen=True)
class MethodField:
    """A recipe key that only some methods read.

    ``parse(validator, value, field_path)`` checks and converts the raw value (raising the
    validator's one-line ``UserError``). ``with_auto``: the key is also accepted with
    ``method: auto`` (it then applies only if auto picks this method).
    """

    name: str
    parse: Callable[[Any, Any, str], Any]
    default: Any = None
    with_auto: bool = False


@dataclass
class Solved:
    """One solve's outcome: new tensors by qualified name and its manifest entry."""

    new_tensors: dict[str, torch.Tensor]
    info: dict


@dataclass(frozen=True)
class AutoChoice:
    site: str | None
    reason: str


class EditMethod:
    """Base class of the method plug-ins (see the module docstring for the protocol)."""

    name: str = ""
    title: str = ""  # how people call it ("LocoEdit")
    summary: str = ""
    edits_unet_layers: bool = True
    layers_refusal: str = ""  # why a recipe's ``layers`` is refused (text-encoder methods)
    # Whether the method reads its UNet context rows only through their Gram statistics (a
    # ridge solve), so that each prompt's padding rows may come compressed to their leading
    # directions (compiler.methods.rows.compress_padding); False: the raw rows (neurons' z-scores).
    padding_statistics: bool = False
    fields: tuple[MethodField, ...] = ()

    def auto_choice(self, edit: Edit, family) -> AutoChoice | None:
        """What ``method: auto`` picks for this edit on this family, if this method."""
        return None

    def site(self, edit: Edit) -> str | None:
        """Where the method edits, when it has several places (``None``: one place)."""
        return None

    def capture_point(self, model) -> tuple[object, str] | None:
        """Where the state this method moves is read, as ``(module, name)``: neighbours of an
        edit are found in that state (``compiler.resolve.find_neighbours``). ``None``: the text
        encoder's output, the context of every UNet cross-attention layer."""
        return None

    def default_eos(self, site: str | None) -> bool:
        """Whether an edit remaps the end-of-text token when its recipe does not say. UNet K/V
        and ``out_proj`` edits read states that already summarise the prompt, so EOS (and
        padding) must move too."""
        return True

    def where(self, edit: Edit) -> str:
        """Where a method that edits no UNet layers edits, for summaries."""
        return ""

    def edit_details(self, edit: Edit) -> list[str]:
        """Short notes on the edit's method-only keys that differ from their defaults."""
        return []

    def bench_variants(self) -> dict[str, tuple[dict, str]]:
        """The variants ``editc bench`` runs: label -> (recipe keys, title)."""
        return {self.name: ({}, f"editc {self.title}")}

    def build_rows(self, context: RowContext, plans: list[PlannedEdit]) -> Any:
        """Embed what the solve needs (timed as ``embed``)."""
        raise NotImplementedError

    def solve(self, context: RowContext, plans: list[PlannedEdit], rows: Any) -> list[Solved]:
        """New tensors from the rows (timed as ``solve``); the pipeline is not modified."""
        raise NotImplementedError

    def describe(self, plan: PlannedEdit) -> dict:
        """Extra manifest fields of one planned edit."""
        return {}
