"""The data-safety invariants of ``compiler.io``, one test each, with fault injection.

Subprocesses only where a real process matters: a second writer holding the lock, a writer
killed between two steps of a replace, a writer under a file-size limit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.cli import main
from compiler.errors import UserError
from compiler.io import (atomic_output_dir, check_output_path, claim_output, link_or_copy,
                         resolve_recipe_output, write_atomically)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "van_gogh.yaml"


def _python(script: str, *args: str, **kwargs) -> subprocess.Popen:
    # The repository first, then whatever PYTHONPATH already holds (a machine's carried wheels).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- 1. an output never equals, contains or lies inside an input -------------------------------


@pytest.mark.parametrize("where", ["equal", "inside", "contains"])
def test_output_overlapping_an_input_is_refused_even_with_force(tmp_path, where):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    out = {"equal": model, "inside": model / "unet" / "edited", "contains": tmp_path / "models"}[where]
    result = CliRunner().invoke(main, ["compile", str(RECIPE), "--model", str(model), "--out", str(out),
                                       "--force", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "the input" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _names(model) == ["model_index.json"]  # untouched, nothing written inside


def test_a_hard_link_of_the_input_is_the_input(tmp_path):
    source = tmp_path / "model.safetensors"
    source.write_bytes(b"x" * 10)
    alias = tmp_path / "alias.safetensors"
    os.link(source, alias)
    with pytest.raises(UserError, match="hard link"):
        check_output_path(alias, force=True, inputs=[source])


# ---- 2. a file a user may edit never shares an inode with the input ----------------------------


def test_configs_are_copied_and_only_large_weights_are_linked(tmp_path):
    config, weights = tmp_path / "config.json", tmp_path / "model.safetensors"
    config.write_text('{"a": 1}')
    weights.write_bytes(b"\0" * (2 << 20))
    small_weights = tmp_path / "small.safetensors"
    small_weights.write_bytes(b"\0" * 16)
    out = tmp_path / "out"
    assert link_or_copy(config, out / "config.json") in ("copy", "reflink")
    assert link_or_copy(small_weights, out / "small.safetensors") in ("copy", "reflink")
    assert link_or_copy(weights, out / "model.safetensors") in ("link", "reflink")
    assert os.stat(out / "config.json").st_ino != os.stat(config).st_ino
    with (out / "config.json").open("a") as f:  # a user edits the output's config
        f.write("\n")
    os.chmod(out / "config.json", 0o600)
    assert config.read_text() == '{"a": 1}' and os.stat(config).st_mode & 0o777 != 0o600


# ---- 3. one writer per output path --------------------------------------------------------------

_HOLD = """
    import sys, time
    from compiler.io import claim_output
    with claim_output(sys.argv[1]) as claim, claim.staging() as tmp:
        (tmp / "half").write_text("x")
        print("holding", flush=True)
        time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_killed_writer_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    holder = _python(_HOLD, str(out))
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(UserError, match=f"another editc process \\(pid {holder.pid}\\)"):
            with claim_output(out):
                pass
        result = CliRunner().invoke(main, ["compile", str(RECIPE), "--out", str(out), "--quiet"])
        assert result.exit_code == 2 and "another editc process" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    # The lock died with its holder; the next writer cleans the killed one's temporary.
    with atomic_output_dir(out) as folder:
        (folder / "a").write_text("new")
    assert _names(tmp_path) == ["out"] and _names(out) == ["a"]


# ---- 4. --force always leaves the old or the new output -----------------------------------------

_KILLED_REPLACE = """
    import os, signal, sys
    from compiler.io import atomic as io
    stage, exchange = sys.argv[2], sys.argv[3] == "exchange"
    if not exchange:
        io._exchange = lambda source, target: False   # a filesystem without RENAME_EXCHANGE
    io._checkpoint = lambda at: os.kill(os.getpid(), signal.SIGKILL) if at == stage else None
    with io.atomic_output_dir(sys.argv[1], force=True) as folder:
        (folder / "a").write_text("new")
"""


@pytest.mark.parametrize("exchange,stage", [("exchange", "exchanged"), ("move-aside", "moved-aside")])
def test_a_replace_killed_half_way_leaves_the_old_or_the_new_output(tmp_path, exchange, stage):
    out = tmp_path / "out"
    with atomic_output_dir(out) as folder:
        (folder / "a").write_text("old")
    killed = _python(_KILLED_REPLACE, str(out), stage, exchange)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    if exchange == "exchange":  # one syscall swapped them: the new output is in place
        assert (out / "a").read_text() == "new"
    # The next claim repairs and cleans: the old output comes back if it was moved aside.
    with claim_output(out, force=True):
        pass
    assert _names(tmp_path) == ["out"]
    assert (out / "a").read_text() == ("new" if exchange == "exchange" else "old")


def test_a_failed_writer_leaves_the_old_output_and_no_temporaries(tmp_path):
    target = tmp_path / "out.txt"
    write_atomically(target, "first")
    with pytest.raises(UserError, match="already exists"):
        write_atomically(target, "second")
    write_atomically(target, "second", force=True)
    assert target.read_text() == "second"
    folder = tmp_path / "folder"
    with atomic_output_dir(folder) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(folder, force=True) as tmp:
            (tmp / "a").write_text("half-written")
            raise RuntimeError("writer crashed")
    assert (folder / "a").read_text() == "old"
    assert _names(tmp_path) == ["folder", "out.txt"]


# ---- 5. disk full / permissions: exit 2, one line, nothing left ----------------------------------

_SIZE_LIMITED = """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    from compiler.cli import main
    main(sys.argv[1:])
"""


def test_disk_full_exits_2_with_one_line_and_leaves_nothing(tmp_path, tiny):
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    limited = _python(_SIZE_LIMITED, "export", "single-file", str(tiny("sd1")), "--out",
                      str(out_dir / "model.safetensors"))
    _, stderr = limited.communicate(timeout=300)
    assert limited.returncode == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "file size limit" in stderr
    assert _names(out_dir) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_folder_is_refused_before_loading(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = CliRunner().invoke(main, ["compile", str(RECIPE), "--out", str(folder / "x"), "--quiet"])
        assert result.exit_code == 2 and "not writable" in result.stderr
    finally:
        folder.chmod(0o700)


def test_disk_errors_raised_inside_a_writer_become_one_line(tmp_path):
    with pytest.raises(UserError, match="no space left"):
        with atomic_output_dir(tmp_path / "out") as folder:
            (folder / "a").write_text("x")
            raise OSError(28, "No space left on device", str(folder / "a"))
    assert _names(tmp_path) == []


# ---- output paths: recipes, ~, "" ----------------------------------------------------------------


def test_recipe_output_paths_are_taken_from_the_recipe_folder(tmp_path):
    recipe = tmp_path / "recipes" / "r.yaml"
    assert resolve_recipe_output(recipe, "out/x") == (tmp_path / "recipes" / "out" / "x", False)
    with pytest.raises(UserError, match="climbs out"):
        resolve_recipe_output(recipe, "../../../../elsewhere")
    assert resolve_recipe_output(recipe, "/abs/x") == (Path("/abs/x"), True)
    assert resolve_recipe_output(recipe, "~/x")[0] == Path.home() / "x"


def test_an_empty_out_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["compile", str(RECIPE), "--out", "", "--quiet"])
    assert result.exit_code == 2 and "--out: is empty" in result.stderr


def test_generate_does_not_overwrite_a_picture_without_force(tmp_path):
    picture = tmp_path / "a.png"
    picture.write_bytes(b"mine")
    result = CliRunner().invoke(main, ["generate", "a red circle", "--out", str(picture)])
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert picture.read_bytes() == b"mine"



def test_a_recipe_output_that_climbs_out_of_its_folder_is_refused(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = folder / "r.yaml"
    recipe.write_text(RECIPE.read_text().replace("outputs:\n", "outputs:\n  dir: ../../../../elsewhere\n"))
    result = CliRunner().invoke(main, ["compile", str(recipe), "--quiet"])
    assert result.exit_code == 2 and "climbs out of the recipe's folder" in result.stderr, result.output
    assert _names(tmp_path) == ["recipes"] and _names(folder) == ["r.yaml"]


def test_an_output_inside_a_hub_repo_given_by_id_is_refused(tmp_path, monkeypatch):
    """A repo id's snapshot files are links into the repo's blobs/: the whole repo is input."""
    repo = tmp_path / "cache" / "models--org--m"
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["compile", str(RECIPE), "--model", "org/m", "--out",
                                       str(repo / "blobs" / "edited"), "--quiet"])
    assert result.exit_code == 2 and "lies inside the input" in result.stderr, result.output
    assert _names(repo / "blobs") == []


def test_leftovers_of_an_older_editc_are_repaired(tmp_path):
    """Older editc named its temporaries .NAME.tmp-PID / .NAME.old-PID (a kill between its two
    renames left no NAME at all): the next writer puts the old output back and cleans up."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / f".out.old-{dead}").mkdir()
    (tmp_path / f".out.old-{dead}" / "a").write_text("old")
    (tmp_path / f".out.tmp-{dead}").mkdir()
    with claim_output(tmp_path / "out", force=True):
        pass
    assert _names(tmp_path) == ["out"] and (tmp_path / "out" / "a").read_text() == "old"


def test_an_output_under_a_file_is_refused_before_loading(tmp_path):
    (tmp_path / "a-file").write_text("x")
    result = CliRunner().invoke(main, ["compile", str(RECIPE), "--out", str(tmp_path / "a-file" / "out"), "--quiet"])
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr, result.output


@pytest.mark.parametrize("args,expected", [(["--seeds", "0-99999999"], "more than 1024 seeds"),
                                           (["--seeds", "-5"], "out of range"),
                                           (["--steps", "0"], "0 is not in the range")])
def test_generate_refuses_unbounded_requests_before_loading(tmp_path, args, expected):
    result = CliRunner().invoke(main, ["generate", "a red circle", "--out", str(tmp_path / "a.png"), *args])
    assert result.exit_code == 2 and expected in result.stderr, result.output
    assert _names(tmp_path) == []
