"""Defaults shared by the recipe schema and the solver, defined once."""

DEFAULT_LAMBDA = 0.01  # the ridge λ of both papers (Diff-QuickFix, LocoEdit)
