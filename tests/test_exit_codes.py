"""The exit-code contract every command honours (README "Exit codes"): 0 passed, 1 a verify
gate failed, 2 bad input (one line on stderr naming the file or field and the fix, never a
traceback), anything else a bug (3: traceback, then one line)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from compiler.cli import BAD_INPUT, BUG, main


def _leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    context = click.Context(group)  # list_commands/get_command: groups may be lazy (editc export)
    for name, command in sorted((n, group.get_command(context, n)) for n in group.list_commands(context)):
        if isinstance(command, click.Group):
            found += _leaf_commands(command, prefix + (name,))
        else:
            found.append(prefix + (name,))
    return found


COMMANDS = [" ".join(path) for path in _leaf_commands(main)]

# Per command: arguments that are bad input the command itself must refuse (not click).
BAD_INPUT_ARGS = {
    "apply": ["{tmp}/missing.delta.safetensors", "--to", "toy", "--out", "{tmp}/applied"],
    "bench": ["--quick", "--model", "{tmp}/missing", "--out", "{tmp}/bench"],
    "compile": ["{tmp}/missing.yaml", "--out", "{tmp}/out"],
    "export onnx": ["{tmp}/missing", "--out", "{tmp}/onnx"],
    "export single-file": ["{tmp}/missing", "--out", "{tmp}/model.safetensors"],
    "generate": ["a red circle", "--model", "{tmp}/missing", "--out", "{tmp}/image.png"],
    "inspect": ["{tmp}/missing"],
    "locate": ["--concept", "van gogh", "--replacement", "a painting", "--attribute", "style",
               "--model", "{tmp}/missing", "--out", "{tmp}/locate"],
    "recipe check": ["{tmp}/missing.yaml"],
    "trace": ["--prompt", "a red circle", "--subject", "red", "--model", "{tmp}/missing", "--out", "{tmp}/trace"],
    "verify": ["{tmp}/missing.yaml", "--edited", "{tmp}/edited"],
}


def _assert_one_line(result, code: int = BAD_INPUT) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("editc: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_every_command_has_a_bad_input_case():
    assert sorted(BAD_INPUT_ARGS) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_input_exits_2_with_one_line(command, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in BAD_INPUT_ARGS[command]]
    line = _assert_one_line(CliRunner().invoke(main, [*command.split(), *args]))
    assert str(tmp_path / "missing") in line  # it names the file
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # and writes nothing


@pytest.mark.parametrize("command", COMMANDS)
def test_a_usage_error_exits_2_with_one_line(command):
    line = _assert_one_line(CliRunner().invoke(main, [*command.split(), "--no-such-option"]))
    assert "--no-such-option" in line and f"{command} --help" in line


def test_an_unknown_command_exits_2_with_one_line():
    assert "frobnicate" in _assert_one_line(CliRunner().invoke(main, ["frobnicate"]))


def test_a_bug_exits_3_never_1(monkeypatch, tmp_path):
    import compiler.cli.recipe_cmd

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(compiler.cli.recipe_cmd, "load_recipe", broken)
    result = CliRunner().invoke(main, ["recipe", "check", str(tmp_path / "any.yaml")])
    assert result.exit_code == BUG, result.output
    assert "Traceback" in result.stderr and "internal error" in result.stderr.strip().splitlines()[-1]
