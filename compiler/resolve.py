"""Resolve: turn each edit of a recipe into prompt pairs, token positions and embedding rows.

An edit "concept -> replacement" becomes prompt pairs (the same template filled once with the
concept and once with the replacement). For each pair we find the *last subject token* of the
concept (and of the replacement), and optionally the end-of-text token, and read the states the
model computes there:

- for LocoEdit, the text encoder's output (the UNet's cross-attention context), so that the
  edited ``to_k``/``to_v`` map the concept's rows onto what the old weights gave the target's;
- for Diff-QuickFix, the inputs of the text encoder's layer-0 self-attention ``out_proj``, or
  for its ``v_proj`` site the layer's inputs mixed by that attention's own weights, per head.

Prompts come from the model's vocabulary (``compiler.prompts``): the real-world one for real
checkpoints, the toy world's for the toy model, or the recipe's own file.
"""

from __future__ import annotations

import weakref

import os
from pathlib import Path

import torch

from compiler import prompts as vocab
from compiler.errors import UserError

from compiler.prompts import PromptPair, Vocabulary


# The embedded toy model's vocabulary file (data beside its weights; nothing is imported).
TOY_VOCABULARY = Path(__file__).resolve().parent / "toy" / "weights" / "vocabulary.yaml"


def vocabulary_of(model, recipe_vocabulary=None) -> Vocabulary:
    """The vocabulary a model gets: ``model`` is a ``LoadedModel``, a pipeline or a folder."""
    folder = getattr(model, "source_path", None) or getattr(model, "name_or_path", None)
    if folder is None and isinstance(model, (str, os.PathLike)):
        folder = model
    if recipe_vocabulary is None and folder and vocab.find_model_vocabulary(folder) is None:
        from compiler.judges import toy_judge_folder_for

        if toy_judge_folder_for(folder) is not None:
            # A toy-world model (its judge beside it, as verify recognises it) saved without its
            # vocabulary file: the toy world's words, from the embedded toy model's folder.
            return vocab.load_vocabulary(TOY_VOCABULARY)
    return vocab.vocabulary_for(folder or None, recipe_vocabulary)


def state_encoder(pipe, capture: torch.nn.Module | None = None, capture_name: str = ""):
    """``encode(prompts, phrases)``: each prompt's state at the last token of its phrase, the
    state an edit moves (the text encoder's output, or with ``capture`` that module's input,
    e.g. layer 0's ``out_proj`` for Diff-QuickFix, named ``capture_name``). For ranking
    neighbours; the states are kept in the prompt-state cache (``compiler.preserve_cache``),
    keyed by the text encoder's content hash, so a second recipe on a model encodes only what
    is new."""
    from compiler.device import compute_tag
    from compiler.encode import PromptEncoder
    from compiler.preserve_cache import PromptStateCache, text_encoder_hash

    encoder = PromptEncoder(pipe)  # a pipeline or a LoadedModel (then only its text encoder)
    tokenizer = encoder.tokenizer()
    hashes = [text_encoder_hash(pipe, c) if hasattr(pipe, "model_hash") else "" for c in encoder.components]
    # No content hash (a pipeline in memory) or an unnamed capture site: nothing to key by.
    # States computed on a GPU round differently from the CPU's: the key names where.
    encoder_hash = (f"{'+'.join(hashes)}@{compute_tag(encoder.device)}"
                    if all(hashes) and (capture is None or capture_name) else "")
    cache = PromptStateCache(encoder_hash, f"input:{capture_name}" if capture is not None else "context")

    def compute(prompts: list[str], positions: list[int]) -> torch.Tensor:
        rows = [[p] for p in positions]
        if capture is None:
            return encoder.context_rows(prompts, rows).cpu()
        return encoder.module_inputs(prompts, rows, capture).cpu()

    def encode(prompts: list[str], phrases: list[str]) -> torch.Tensor:
        return cache.rows(prompts, last_token_indices(tokenizer, prompts, phrases), compute)

    return encode


def template_prompts(phrase: str, attribute: str, vocabulary: Vocabulary, *, heldout: bool = False) -> list[str]:
    return vocab.template_prompts(vocabulary, phrase, attribute, heldout=heldout)


def prompt_pairs(concept: str, replacement: str, attribute: str, extra_prompts=(), *, vocabulary: Vocabulary,
                 templates: bool = True, heldout: bool = False) -> list[PromptPair]:
    """The vocabulary's templates for the attribute (none with ``templates=False``), plus the
    recipe's own prompts (which contain the concept; their target swaps in the replacement)."""
    pairs = vocab.prompt_pairs(vocabulary, concept, replacement, attribute, extra_prompts, heldout=heldout)
    return pairs if templates else pairs[len(pairs) - len(extra_prompts):]


def default_preserve_prompts(avoid: list[str], vocabulary: Vocabulary, count: int | None = None) -> list[str]:
    """Generic captions mentioning none of ``avoid``: UCE-style rows that keep the rest put."""
    return vocab.preserve_captions(vocabulary, avoid, count)


# ----------------------------------------------------------------------------- tokens
def last_token_index(tokenizer, prompt: str, phrase: str) -> int:
    """Index (BOS = 0) of the last token of the last occurrence of ``phrase`` in ``prompt``.

    CLIP's BPE splits at whitespace first, so tokenizing the prompt's prefix that ends with the
    phrase gives exactly the prompt's tokens up to the phrase's last one.
    """
    return last_token_indices(tokenizer, [prompt], [phrase])[0]


def last_token_indices(tokenizer, prompts: list[str], phrases: list[str]) -> list[int]:
    """:func:`last_token_index` of each (prompt, phrase), the prefixes tokenized in one batch."""
    prefixes = []
    for prompt, phrase in zip(prompts, phrases):
        i = prompt.lower().rfind(phrase.lower())
        if i < 0:
            raise ValueError(f"{phrase!r} does not occur in prompt {prompt!r}")
        prefixes.append(prompt[: i + len(phrase)])
    return token_counts(tokenizer, prefixes)  # the prefix's tokens: +1 for BOS, -1 for the last index


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """How many tokens each text is (no BOS or EOS), the new ones tokenized in one batch.
    Counts are remembered per tokenizer: ranking neighbours for each edit of a recipe, and a
    recipe of 100 concepts (16,000 prompts, measured 8.5 s one at a time), ask again."""
    known = _TOKEN_COUNTS.setdefault(tokenizer, {})
    todo = list(dict.fromkeys(t for t in texts if t not in known))
    if todo:
        known.update(zip(todo, map(len, tokenizer(todo, add_special_tokens=False, verbose=False).input_ids)))
    return [known[t] for t in texts]


_TOKEN_COUNTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_prompt_lengths(tokenizer, pairs: list[PromptPair], concept: str) -> None:
    """Every source and target prompt fits the text encoder (BOS and EOS included); else one
    line with the token count, before anything is encoded (the encoder would truncate it)."""
    limit = getattr(tokenizer, "model_max_length", None) or 77
    prompts = [prompt for pair in pairs for prompt in (pair.source, pair.target)]
    for prompt, count in zip(prompts, token_counts(tokenizer, prompts)):
        tokens = count + 2  # BOS, EOS
        if tokens > limit:
            shown = concept if len(concept) <= 40 else concept[:40] + "…"
            raise UserError(f"edit {shown!r}: a prompt is {tokens} tokens long (with BOS and EOS), over "
                            f"the text encoder's limit of {limit} ({prompt[:60]!r}…); shorten the concept, "
                            f"the replacement or the prompt")


def check_special_tokens(tokenizer, edit, field_path: str) -> None:
    """A concept or replacement that contains one of the tokenizer's special tokens
    (``<|endoftext|>``, ``</s>``, ...) names no concept: the tokenizer reads it as a marker, and
    the edit would remap the marker every prompt ends with."""
    special = [t for t in getattr(tokenizer, "all_special_tokens", ()) if isinstance(t, str) and t.strip()]
    for name in ("concept", "replacement"):
        text = getattr(edit, name).lower()
        token = next((t for t in special if t.lower() in text), None)
        if token is not None:
            raise UserError(f"{field_path}.{name}: {getattr(edit, name)!r} contains the tokenizer's special "
                            f"token {token!r}, which marks the start or end of a prompt, not a concept; "
                            f"give words")


def eos_index(tokenizer, prompt: str) -> int:
    return token_counts(tokenizer, [prompt])[0] + 1


# ----------------------------------------------------------------------------- states
# Text-encoder states come from the one prompt encoder, ``compiler.encode.PromptEncoder``.


def gather_rows(states: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Rows ``states[n, p]`` for every prompt n and each of its positions p."""
    return torch.cat([states[n, pos] for n, pos in enumerate(positions)])


def pair_positions(tokenizer, pairs: list[PromptPair], concept: str, replacement: str, eos: bool,
                   trailing_to: int | None = None, padding: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Matching positions in source and target prompts: the last subject token and, with
    ``eos``, the end-of-text token; with ``trailing_to`` (e.g. 77) also the padding positions
    after EOS up to that length (the first ``padding`` of them when it is given).

    The UNet attends to all 77 context tokens, and in CLIP's causal encoder the states after
    EOS summarize the whole prompt, so they carry the concept as well (LocoEdit must remap
    them); the k-th trailing position of the source maps to the k-th of the target.
    """
    src, tgt = [], []
    check_prompt_lengths(tokenizer, pairs, concept)
    sources, targets = [p.source for p in pairs], [p.target for p in pairs]
    s_last = last_token_indices(tokenizer, sources, [concept] * len(pairs))
    t_last = last_token_indices(tokenizer, targets, [replacement] * len(pairs))
    s_count, t_count = token_counts(tokenizer, sources), token_counts(tokenizer, targets)
    for i in range(len(pairs)):
        s, t = [s_last[i]], [t_last[i]]
        if eos:
            s_eos, t_eos = s_count[i] + 1, t_count[i] + 1
            trailing = 1 if trailing_to is None else trailing_to - max(s_eos, t_eos)
            if padding is not None:
                trailing = min(trailing, 1 + padding)
            s.extend(range(s_eos, s_eos + trailing))
            t.extend(range(t_eos, t_eos + trailing))
        src.append(s)
        tgt.append(t)
    return src, tgt


def all_token_positions(tokenizer, prompts: list[str], length: int | None = None,
                        padding: int | None = None) -> list[list[int]]:
    """The states preservation rows keep in place: BOS through EOS of each prompt, or all
    ``length`` positions (padding included) when the edit also maps the trailing tokens (BOS
    through EOS and the first ``padding`` positions after it, when that is given)."""
    if length is not None and padding is None:
        return [list(range(length)) for _ in prompts]
    eos = [count + 1 for count in token_counts(tokenizer, prompts)]
    if length is not None:
        return [list(range(min(length, e + 1 + padding))) for e in eos]
    return [list(range(e + 1)) for e in eos]


# ----------------------------------------------------------------------------- neighbours
def find_neighbours(pipe, vocabulary: Vocabulary, concept: str, attribute: str, *, k: int,
                    avoid=(), capture: torch.nn.Module | None = None, capture_name: str = "") -> list[vocab.Neighbour]:
    """The ``k`` concepts of ``vocabulary`` nearest ``concept`` in this model's own text space
    (see ``compiler.prompts.neighbours``): at the text encoder's output, or with ``capture``
    at that module's input (Diff-QuickFix's keys; ``capture_name`` names it for the cache)."""
    encode = state_encoder(pipe, capture, capture_name)
    return vocab.rank_neighbours(vocabulary, concept, attribute, encode, k=k, avoid=avoid)
