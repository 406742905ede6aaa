"""Checkpoint headers are validated before anything is allocated: every malformed file is one
line and exit 2, never a traceback, a hang or gigabytes of memory. Property-based (hypothesis,
derandomized: the same examples on every run) plus the cases users met."""

from __future__ import annotations

import json
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from compiler.cli import main
from compiler.errors import UserError
from compiler.models.checkpoint import load_ckpt_state_dict, read_safetensors_header

FUZZ = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _safetensors_bytes(header, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "I8", "BOOL", "X9"]) | json_values,
    "shape": st.lists(st.integers(-3, 2**40), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-3, 2**40), min_size=2, max_size=2) | json_values,
})
headers = st.dictionaries(st.text(min_size=1, max_size=12), entries | json_values, max_size=4).flatmap(
    lambda h: st.fixed_dictionaries({**{k: st.just(v) for k, v in h.items()}},
                                    optional={"__metadata__": json_values}))


@FUZZ
@given(header=headers, data=st.binary(max_size=64))
def test_any_header_is_read_or_refused_in_one_line(tmp_path_factory, header, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(_safetensors_bytes(header, data))
    try:
        entries, metadata = read_safetensors_header(path)
    except UserError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        return
    size = len(data)  # accepted: then every promise holds
    assert all(isinstance(v, str) for v in metadata.values())
    for info in entries.values():
        start, end = info["data_offsets"]
        assert 0 <= start <= end <= size and all(isinstance(n, int) and n >= 0 for n in info["shape"])


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(0, 64))
def test_a_damaged_real_header_is_read_or_refused_in_one_line(tmp_path_factory, flips, cut):
    folder = tmp_path_factory.mktemp("flip")
    save_file({"a.weight": torch.ones(3, 2), "b.bias": torch.zeros(2)}, folder / "ok.safetensors",
              metadata={"k": "v"})
    blob = bytearray((folder / "ok.safetensors").read_bytes())
    for position, value in flips:
        blob[position % len(blob)] = value
    path = folder / "bad.safetensors"
    path.write_bytes(bytes(blob[: len(blob) - cut]))
    try:
        read_safetensors_header(path)
    except UserError as err:
        assert "\n" not in str(err)


def _inspect(path: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, ["inspect", str(path)])
    assert not caught, [str(w.message) for w in caught]
    return result


VALID = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {
    "metadata-list": ({"__metadata__": ["a"], "w.weight": VALID}, "__metadata__"),
    "string-offsets": ({"w.weight": {**VALID, "data_offsets": "0,8"}}, "data_offsets"),
    "string-shape": ({"w.weight": {**VALID, "shape": "2"}}, "shape"),
    "negative-shape": ({"w.weight": {**VALID, "shape": [-2]}}, "shape"),
    "offsets-outside": ({"w.weight": {**VALID, "shape": [4], "data_offsets": [0, 16]}}, "truncated"),
    "overlap": ({"w.weight": VALID, "v.weight": {**VALID, "data_offsets": [4, 12]}}, "overlap"),
    "int8-weight": ({"w.weight": {"dtype": "I8", "shape": [8], "data_offsets": [0, 8]}}, "float checkpoints only"),
    "bool-weight": ({"w.weight": {"dtype": "BOOL", "shape": [8], "data_offsets": [0, 8]}}, "float checkpoints only"),
    "entry-not-object": ({"w.weight": [1, 2]}, "not an object"),
    "deep-json": (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_safetensors_header_exits_2_with_one_line(tmp_path, case):
    header, expected = BAD_HEADERS[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(_safetensors_bytes(header, b"\0" * 12))
    result = _inspect(path)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr


def _self_containing(path: Path) -> None:
    wrapper: dict = {"global_step": 1}
    wrapper["state_dict"] = wrapper
    torch.save(wrapper, path)


BAD_CKPTS = {
    "random-bytes.ckpt": (lambda p: p.write_bytes(bytes(range(256)) * 40), "not a torch zip checkpoint"),
    "raw-pickle.pt": (lambda p: p.write_bytes(pickle.dumps({"state_dict": {"a": 1}}, protocol=4)),
                      "not a torch zip checkpoint"),
    "self-containing.ckpt": (_self_containing, "contains itself"),
    "int-weights.ckpt": (lambda p: torch.save({"state_dict": {"w.weight": torch.zeros(4, dtype=torch.int8)}}, p),
                         "float checkpoints only"),
}


@pytest.mark.parametrize("case", list(BAD_CKPTS))
def test_bad_ckpt_exits_2_with_one_line_and_no_warning(tmp_path, case):
    make, expected = BAD_CKPTS[case]
    path = tmp_path / case
    make(path)
    result = _inspect(path)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr


def test_a_real_ckpt_still_loads(tiny):
    tensors, _ = load_ckpt_state_dict(tiny("sd1", "single-file", ".ckpt"))
    assert len(tensors) > 100 and all(t.is_floating_point() for n, t in tensors.items() if n.endswith(".weight"))
