"""Every bad recipe is one line and exit 2: bounded before parsing (size, nesting, special
files), bounded after (values, integers, text), every numeric field's range checked; and what
`recipe check` accepts, compile does not reject with a traceback. Property-based (hypothesis,
derandomized) plus the cases users met."""

from __future__ import annotations

import os

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.cli import main
from compiler.errors import UserError
from compiler.recipe import Recipe, loads_recipe

FUZZ = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

EDIT = "model: toy\nedits:\n  - concept: van gogh\n    replacement: a painting\n    attribute: style\n"


def _one_line_or_recipe(text: str, path: str = "r.yaml") -> None:
    try:
        assert isinstance(loads_recipe(text, path), Recipe)
    except UserError as err:
        assert "\n" not in str(err) and str(err).startswith(path)


scalars = (st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats() | st.text(max_size=12)
           | st.sampled_from(["toy", "auto", "locoedit", "neurons", "quickfix", "style", "fact", "object",
                              "van gogh", "a painting", "[8, 9]", "1e-2", "default"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.sampled_from(["concept", "replacement", "attribute", "method", "layers", "lambda", "prompts",
                     "preserve", "eos", "neurons_top_k", "site", "dir", "formats", "seeds", "steps",
                     "guidance_scale", "enabled", "x"]) | st.text(max_size=5), c, max_size=5), max_leaves=16)
edits = st.lists(st.fixed_dictionaries({"concept": st.just("van gogh"), "replacement": st.just("a painting"),
                                        "attribute": st.just("style")},
                                       optional={k: values for k in ("method", "layers", "lambda", "prompts",
                                                                     "eos", "neurons_top_k", "site", "preserve")}),
                 max_size=3)
recipes = st.fixed_dictionaries({"edits": edits | values},
                                optional={"model": values, "lambda": values, "preserve": values,
                                          "outputs": values, "verify": values, "extra": values})


@FUZZ
@given(data=recipes)
def test_any_recipe_structure_parses_or_is_one_line(data):
    _one_line_or_recipe(yaml.safe_dump(data, allow_unicode=True), "r.yaml")


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("[]{}:-,&*!|>'\"#\n 0123456789eE.+abc\\\t")), max_size=200))
def test_any_yaml_text_parses_or_is_one_line(text):
    _one_line_or_recipe(EDIT + text, "r.yaml")
    _one_line_or_recipe(text, "r.toml")


BAD = {
    "huge-int": (EDIT + "    lambda: " + "9" * 5000 + "\n", "more digits"),
    "deep-flow": ("model: toy\nx: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than"),
    "deep-block": ("model: toy\nx:\n" + "".join(" " * i + "- \n" for i in range(1, 300)), "nested"),
    "surrogate": (EDIT.replace("van gogh", '"van gogh \\ud800"'), "surrogate"),
    "lambda-tiny": (EDIT + "    lambda: 5.0e-324\n", "outside the valid range"),
    "lambda-huge": (EDIT + "    lambda: 1.0e+308\n", "outside the valid range"),
    "top-k-float": (EDIT + "    method: neurons\n    neurons_top_k: 1.0e+30\n", "whole number"),
    "top-k-huge": (EDIT + "    method: neurons\n    neurons_top_k: 99999999\n", "too large"),
    "layer-huge": (EDIT + "    layers: [99999999]\n", "out of range"),
    "past-64-bits": (EDIT + "    layers: [" + "9" * 30 + "]\n", "the number has 30 digits"),
    "aliases": ("a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcde", "bcdef")), "more than 100000 values"),
    "seeds": (EDIT + "verify:\n  seeds: 100000000\n", "too large"),
    "guidance": (EDIT + "verify:\n  guidance_scale: 1.0e+300\n", "outside the valid range"),
    "too-big": (EDIT + "#" * (2 << 20) + "\n", "over 1024 KiB"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_exits_2_with_one_line(tmp_path, case):
    text, expected = BAD[case]
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    result = CliRunner().invoke(main, ["recipe", "check", str(path)])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    for path, kind in ((fifo, "a FIFO"), (tmp_path / "zero.yaml", "a device")):
        result = CliRunner().invoke(main, ["recipe", "check", str(path)])
        assert result.exit_code == 2 and kind in result.stderr, result.output


# ---- what recipe check accepts, compile refuses in one line (not a traceback) ---------------------


@pytest.mark.parametrize("family,extra,expected", [
    ("if", "    method: locoedit\n    layers: [1, 2]\n", "DeepFloyd IF has no editable location"),
    ("sd1", "    layers: [3, 4]\n    prompts: [a red circle in the style of van gogh" + " very" * 80 + "]\n",
     "tokens long"),
    ("sd1", "    method: neurons\n    layers: [3]\n    neurons_top_k: 60000\n", "output neurons"),
])
def test_compile_refuses_in_one_line_what_the_model_cannot_take(tiny, tmp_path, family, extra, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(EDIT + extra)
    assert CliRunner().invoke(main, ["recipe", "check", str(recipe)]).exit_code == 0
    result = CliRunner().invoke(main, ["compile", str(recipe), "--model", str(tiny(family)),
                                       "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
