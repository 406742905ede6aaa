"""Causal tracing on a quickly trained toy model: the corruption and the restorations touch
exactly the states they claim to, results have their schema and are cached, the CLI works."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compiler.errors import UserError
from compiler.locate.engine import GenerationSettings, PromptEmbeddings, embed_prompts, embed_unconditional
from compiler.locate.engine import generate_from_embeddings
from compiler.locate.trace import (
    TextEncoderTracer,
    UNetTracer,
    prompt_tokens,
    trace_text_encoder,
    trace_unet,
    unet_components,
    write_trace_outputs,
)

PROMPT = "a house in the style of van gogh"


@pytest.fixture(scope="module")
def toy(quick_toy_weights):
    from compiler.models.load import load_model
    from compiler.toy.judge import load_judge

    weights = quick_toy_weights
    loaded = load_model(str(weights / "pipeline"))
    loaded.pipeline.set_progress_bar_config(disable=True)
    return loaded, load_judge(weights / "pipeline", weights / "judge")


def test_subject_tokens_are_found(toy):
    tokens = prompt_tokens(toy[0].pipeline.tokenizer, PROMPT, "van gogh")
    assert tokens.labels == ["<bos>", "a", "house", "in", "the", "style", "of", "van", "gogh", "<eos>"]
    assert (tokens.subject_first, tokens.subject_last) == (7, 8)
    with pytest.raises(UserError, match="does not occur"):
        prompt_tokens(toy[0].pipeline.tokenizer, PROMPT, "monet")


def test_text_corruption_and_restoration_touch_only_their_states(toy):
    pipe = toy[0].pipeline
    tokens = prompt_tokens(pipe.tokenizer, PROMPT, "van gogh")
    tracer = TextEncoderTracer(pipe.text_encoder, tokens)
    last_layer = len(tracer.layers) - 1
    noise = torch.randn(1, 2, pipe.text_encoder.get_input_embeddings().weight.shape[1]) * 3
    with tracer:
        clean = tracer.record_clean(pipe, PROMPT).context[0]
        tracer.plan(noise.expand(3, -1, -1), [None, ("layer", last_layer, 8), ("attn", 0, 3)])
        corrupted, restored_last, restored_early = embed_prompts(pipe, [PROMPT] * 3).context
    # CLIP is causal: tokens before the subject never see the noise; the subject's do.
    assert torch.equal(corrupted[:7], clean[:7])
    assert not torch.allclose(corrupted[7:10], clean[7:10])
    # Restoring the last layer's output at "gogh" gives its clean context (only there).
    torch.testing.assert_close(restored_last[8], clean[8], rtol=0, atol=1e-6)
    assert torch.equal(restored_last[9], corrupted[9])
    # Restoring a state before the subject changes nothing: it was clean already.
    assert torch.equal(restored_early, corrupted)
    # The hooks are gone afterwards.
    assert torch.equal(embed_prompts(pipe, [PROMPT]).context[0], clean)


def test_restoring_the_last_unet_block_brings_back_the_clean_images(toy):
    pipe = toy[0].pipeline
    tokens = prompt_tokens(pipe.tokenizer, PROMPT, "van gogh")
    noise = torch.randn(1, 2, pipe.text_encoder.get_input_embeddings().weight.shape[1]) * 3
    with TextEncoderTracer(pipe.text_encoder, tokens) as text_tracer:
        clean_context = embed_prompts(pipe, [PROMPT]).context
        text_tracer.plan(noise, [None])
        corrupt_context = embed_prompts(pipe, [PROMPT]).context
    table = PromptEmbeddings(torch.cat([clean_context, corrupt_context]))
    uncond = embed_unconditional(pipe)
    settings = GenerationSettings(steps=3, batch=2)
    components = unet_components(pipe.unet)
    assert [n for n, _ in components][-1] == "up_blocks.3" and len(components) == 9

    def run(rows, restore, recording=False):
        tracer.recording = recording
        tracer.plan(restore, [0, 1])
        return next(generate_from_embeddings(pipe, table, uncond, rows, [0, 1], settings, progress=False))[2]

    tracer = UNetTracer(pipe.unet, components)
    with tracer:
        clean = run([0, 0], [None, None], recording=True)
        corrupted = run([1, 1], [None, None])
        restored = run([1, 1], ["up_blocks.3", "down_blocks.0"])
    assert not np.array_equal(corrupted, clean)
    assert np.array_equal(restored[0], clean[0])  # the last block's output is the prediction
    assert not np.array_equal(restored[1], clean[1])


def test_traces_schema_cache_and_outputs(toy, tmp_path):
    loaded, judge = toy
    common = dict(judge=judge, seeds=(0,), steps=1, batch=64, model_hash=loaded.model_hash, progress=False)
    text = trace_text_encoder(loaded.pipeline, PROMPT, "van gogh", components=("attn",), **common)
    assert text.num_layers == 4 and text.tokens[8] == "gogh" and text.subject_positions == (7, 8)
    assert np.array(text.clip["attn"]).shape == (4, 10)
    assert np.isnan(text.clip["attn"][0][0])  # BOS is not swept
    assert text.timings["samples"] == 4 * 9 + 2
    assert text.settings["noise_std"] > 0 and text.recovery_by == "rate"
    unet = trace_unet(loaded.pipeline, PROMPT, "van gogh", **common)
    assert len(unet.clip) == len(unet.components) == 9
    for result in (text, unet):
        json.dumps(result.to_dict(), allow_nan=False)  # strict JSON: NaN written as null
    again = trace_text_encoder(loaded.pipeline, PROMPT, "van gogh", components=("attn",), **common)
    assert again.cached and {**again.to_dict(), "cached": False} == text.to_dict()
    written = write_trace_outputs(text, unet, tmp_path)
    assert [p.name for p in written] == ["trace.json", "text_encoder.png", "unet.png"]
    assert json.loads((tmp_path / "trace.json").read_text())["unet"]["components"][4] == "mid_block"


def test_cli_trace_files_and_exit_codes(toy, tmp_path, quick_toy):
    from compiler.cli import main

    pipeline = quick_toy
    out = tmp_path / "trace"
    args = ["trace", "--model", str(pipeline), "--prompt", PROMPT, "--subject", "van gogh", "--steps", "1",
            "--seeds", "0", "--components", "layer", "--out", str(out)]
    runner = CliRunner()
    ok = runner.invoke(main, [*args, "--json"])
    assert ok.exit_code == 0, ok.output
    payload = json.loads(ok.stdout[ok.stdout.index("{"):])
    assert payload["text_encoder"]["components"] == ["layer"] and len(payload["unet"]["components"]) == 9
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder.png", "trace.json", "unet.png"]
    wrong_subject = runner.invoke(main, [*args, "--force", "--subject", "monet"])
    assert wrong_subject.exit_code == 2 and "does not occur" in wrong_subject.stderr
    bad_components = runner.invoke(main, [*args, "--force", "--components", "ffn"])
    assert bad_components.exit_code == 2 and "--components" in bad_components.stderr
    exists = runner.invoke(main, args)
    assert exists.exit_code == 2 and "already exists" in exists.stderr
