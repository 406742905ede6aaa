"""The Python API: the README's example runs, and recipes built in code follow the file rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import compiler as editc

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_api_example_runs(capsys):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (Python API)", "exec"), {})  # noqa: S102 - our own README
    printed = capsys.readouterr().out
    assert "locoedit [2, 3, 4] 6 tensors edited" in printed


def test_recipe_built_in_code_is_validated_like_a_file():
    with pytest.raises(editc.UserError, match=r"^Edit: attribute: 'colour' is not one of style, object, fact$"):
        editc.Edit(concept="van gogh", replacement="a painting", attribute="colour")
    with pytest.raises(editc.UserError, match=r"edits\[0\]\.layers\[0\]: 16 is out of range"):
        editc.Recipe(edits=[editc.Edit(concept="van gogh", replacement="a painting", attribute="style",
                                       layers=[16])])
    edit = editc.Edit(concept=" Van  gogh ", replacement="a painting", attribute="STYLE", layers=[9, 8])
    assert (edit.concept, edit.attribute, edit.layers) == ("Van gogh", "style", (8, 9))
    built = editc.Recipe(edits=[edit])
    from_file = editc.loads_recipe("edits: [{concept: Van gogh, replacement: a painting, attribute: style, "
                                   "layers: [8, 9]}]")
    assert built.edits == from_file.edits and len(built.sha256) == 64
