"""Edit methods as plug-ins: one module each, registered here (one line per method).

Everything that varies by method reads this registry: recipe validation (which ``method``
values and method-only keys exist), the CLI's choices, compile's plan and solve, the manifest
and bench. To add a method, write a module with an :class:`~compiler.methods.base.EditMethod`
subclass and add it to ``REGISTRY`` below.
"""

from __future__ import annotations

from compiler.methods.base import AutoChoice, EditMethod, MethodField, Solved
from compiler.methods.locoedit import LocoEdit
from compiler.methods.neurons import Neurons
from compiler.methods.quickfix import QuickFix

# The registry. Its order is the order compile solves in (a later solve wins on a shared tensor).
REGISTRY: dict[str, EditMethod] = {m.name: m for m in (LocoEdit(), Neurons(), QuickFix())}
# ``method: auto`` asks these in turn; the first that fits the edit and the family wins.
AUTO_PREFERENCE = ("quickfix", "locoedit")

AUTO = "auto"


def method_names() -> tuple[str, ...]:
    """The methods a recipe may name, without ``auto``."""
    return tuple(REGISTRY)


def get_method(name: str) -> EditMethod:
    return REGISTRY[name]


def method_fields() -> dict[str, list[tuple[EditMethod, MethodField]]]:
    """Method-only recipe keys, each with the methods that read it."""
    out: dict[str, list[tuple[EditMethod, MethodField]]] = {}
    for method in REGISTRY.values():
        for spec in method.fields:
            out.setdefault(spec.name, []).append((method, spec))
    return out


__all__ = ["AUTO", "REGISTRY", "AutoChoice", "EditMethod", "MethodField", "Solved", "get_method",
           "method_fields", "method_names"]
