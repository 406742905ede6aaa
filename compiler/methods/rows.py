"""What the methods' solves share: the planned edits, the preservation prompts, the one prompt
encoder (``compiler.encode``), the preservation Gram cache (``compiler.preserve_cache``) and the
UNet context rows (text-encoder outputs at each edit's positions), embedded once for every
method that reads them."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from compiler import resolve

# UNet edits with EOS on also remap every padding position after EOS, and the preservation rows
# keep every padding position in place. Measured on the toy world (bench/edit_toy.py +nopad,
# README "Real size"): without them van gogh is still removed (neighbours 92% vs 95%) but snoopy
# fails specificity (generic 100% -> 83%, neighbours 64% -> 56%). EDITC_PADDING_ROWS=0 turns
# them off (prompts then run only to their EOS: the real-size bench measures both).
PADDING_ROWS = os.environ.get("EDITC_PADDING_ROWS", "1") != "0"
# Edits embedded together before their padding rows are compressed (see padding_directions).
EMBED_CHUNK = 16
# How many padding positions after EOS are rows (None: all, to 77).
PADDING_LIMIT = int(os.environ["EDITC_PADDING_LIMIT"]) if os.environ.get("EDITC_PADDING_LIMIT") else None


@dataclass
class ContextRows:
    """Text-encoder output rows: per plan (``id(plan)``) the source and target rows, plus the
    preservation rows, all at the same token length."""

    by_plan: dict[int, tuple[torch.Tensor, torch.Tensor]]
    preserve: object  # compiler.solve.PreservationGram: PᵀP of the preservation rows
    # Per plan, which of its source rows are padding positions (after EOS), in row order.
    padding: dict[int, torch.Tensor] = field(default_factory=dict)
    # Per preservation group name, its weighted PᵀP (what ``preserve`` sums), for solvers that
    # hold some groups exactly.
    groups: dict = field(default_factory=dict)


@dataclass
class RowContext:
    """One compile's shared inputs. ``plans`` are all planned edits of the recipe (every
    method's), ``preserve`` the preservation prompts, ``lam`` the recipe's λ; ``timings``
    collects embedding time spent on shared rows."""

    model: object
    plans: list
    preserve_groups: list  # compiler.plan.PreserveGroup: prompts kept in place, with their weight
    lam: float
    timings: dict[str, float] = field(default_factory=dict)
    preserve_cache: bool | None = None  # None: on unless EDITC_NO_PRESERVE_CACHE=1
    concept_weighting: str = "concept"  # see concept_weights
    # Text-encoder tensors (qualified names) solved earlier in this compile: this context's
    # prompts are embedded by the encoder holding them (``text_encoders_edited``).
    text_edits: dict[str, torch.Tensor] = field(default_factory=dict)
    _saved: list = field(default_factory=list)
    _base_cache: object = None
    _context_rows: ContextRows | None = None
    _encoder: object = None
    _cache: object = None

    @property
    def preserve(self) -> list[str]:
        """Every preservation prompt, each once (the groups are disjoint)."""
        return [prompt for group in self.preserve_groups for prompt in group.prompts]

    def preserve_gram(self, kind: str, components, positions_for, rows_for):
        """``Σ_g w_g P_gᵀP_g`` over the preservation groups (float64, in group order), each
        group's ``PᵀP`` from the cache: ``positions_for(prompts)`` gives its positions and
        ``rows_for(prompts, positions)`` its rows on a miss."""
        from compiler.solve import PreservationGram

        total, n_rows = None, 0
        device = self.device
        self.last_group_grams = {}
        for group in self.preserve_groups:
            prompts = list(group.prompts)
            positions = positions_for(prompts)
            # On a miss the rows' PᵀP is formed where the rows are (the device); a hit is read.
            gram = self.cache.gram(kind, components, prompts, positions,
                                   lambda prompts=prompts, positions=positions: rows_for(prompts, positions).to(device))
            term = gram.gram.to(device=device, dtype=torch.float64) * group.weight  # × 1.0 is exact in float64
            self.last_group_grams[group.name] = PreservationGram(term, gram.n_rows)
            total = term if total is None else total + term
            n_rows += gram.n_rows
        return None if total is None else PreservationGram(total, n_rows)

    @contextmanager
    def text_encoders_edited(self):
        """While open, the model's text encoder(s) hold ``text_edits`` (as the edited checkpoint
        stores them, cast to the encoder's dtype); restored bit for bit on exit."""
        saved = self._saved = []
        try:
            with torch.no_grad():
                for qualified, tensor in self.text_edits.items():
                    component, name = qualified.split("/", 1)
                    param = self.model.text_encoder(component).get_parameter(name)
                    edited = tensor.to(device=param.device, dtype=param.dtype)
                    saved.append((param, param.detach().clone(), edited))
                    param.copy_(edited)
            yield self
        finally:
            with torch.no_grad():
                for param, old, _ in reversed(saved):
                    param.copy_(old)
            self._saved = []

    @contextmanager
    def _base_text_encoders(self):
        """Inside ``text_encoders_edited``: the base weights back for a while (the replacement
        prompts' rows are what the *unedited* model gives them, LocoEdit's targets)."""
        with torch.no_grad():
            for param, old, _ in self._saved:
                param.copy_(old)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, _, edited in self._saved:
                    param.copy_(edited)

    @property
    def device(self) -> torch.device:
        """Where rows, Grams and solves live: the text encoder's device (the policy's, for a
        model opened by compile; the pipeline's, for ``apply_recipe``)."""
        return self.encoder.device

    @property
    def encoder(self):
        """The one prompt encoder (deduplicated, causal prefixes; reads only the text encoders)."""
        if self._encoder is None:
            from compiler.encode import PromptEncoder

            self._encoder = PromptEncoder(self.model)
        return self._encoder

    @property
    def pipeline(self):
        """The whole diffusers pipeline, built on first use (a plug-in that needs the UNet);
        the built-in methods read only ``encoder`` and ``model.read_tensors``."""
        return self.model.pipeline

    @property
    def tokenizer(self):
        return self.encoder.tokenizer()

    def cache_stats(self):
        """(Gram cache, edit-row cache) statistics of every cache this context used, or None."""
        from compiler.preserve_cache import CacheStats

        caches = [c for c in (self._cache, self._base_cache) if c is not None]
        if not caches:
            return None
        grams, rows = CacheStats(), CacheStats()
        for cache in caches:
            grams.add(cache.stats)
            rows.add(cache.row_stats)
        return grams, rows

    @property
    def cache(self) -> PreserveCache:
        if self._cache is None:
            self._cache = PreserveCache(self.model, self.preserve_cache, self.device, self.text_edits)
        return self._cache

    def context_rows(self) -> ContextRows:
        """The UNet's cross-attention context rows of every plan, embedded in one pass on first
        use (LocoEdit and neurons read the same rows)."""
        if self._context_rows is None:
            self._context_rows = self._embed_context_rows()
        return self._context_rows

    def _embed_context_rows(self) -> ContextRows:
        # Only the edits that move UNet layers read these rows (a text-encoder edit has its own).
        plans = [p for p in self.plans if p.method_plugin.edits_unet_layers]
        tokenizer, encoder = self.tokenizer, self.encoder
        # With padding rows, the trailing (EOS and padding) rows reach to the pipeline's full
        # 77-token contexts, and so do the preservation rows'.
        full = PADDING_ROWS and any(p.eos for p in plans)
        length = encoder.max_length if full else None
        directions = padding_directions()
        by_plan, padding = {}, {}
        # Edits in chunks: each chunk's rows come from the edit-row cache (the missing ones
        # encoded in one pass) and, with padding directions, are compressed before the next
        # chunk is embedded, so a recipe of many concepts never holds all its raw rows.
        chunk = EMBED_CHUNK if directions else len(plans)
        for start in range(0, len(plans), max(1, chunk)):
            part = plans[start : start + max(1, chunk)]
            requests, layouts = [], []
            for plan in part:
                s_pos, t_pos = positions_by_prompt(tokenizer, plan, length)
                requests.append(([pr.source for pr in plan.pairs] + [pr.target for pr in plan.pairs], s_pos + t_pos))
                layouts.append((s_pos, t_pos))
            if self.text_edits:
                rows = self._edited_source_base_target_rows(part, layouts)
            else:
                rows = self.cache.edit_rows("context", encoder.components, requests, encoder.context_rows)
            layouts = [s_pos for s_pos, _ in layouts]
            for plan, r, s_pos in zip(part, rows, layouts):
                n = sum(map(len, s_pos))
                # positions_by_prompt gives [subject, EOS, padding…] per prompt (EOS only with eos)
                own = 2 if plan.eos else 1
                source, target = r[:n], r[n:]
                if directions and plan.method_plugin.padding_statistics:
                    source, target, mask = compress_padding(source, target, [len(p) for p in s_pos], own, directions)
                else:
                    mask = torch.tensor([k >= own for pos in s_pos for k in range(len(pos))])
                by_plan[id(plan)] = (source, target)
                padding[id(plan)] = mask
        preserve_gram = self.preserve_gram("context", encoder.components,
                                           lambda prompts: resolve.all_token_positions(tokenizer, prompts, length,
                                                                                       PADDING_LIMIT),
                                           encoder.context_rows)
        return ContextRows(by_plan, preserve_gram, padding, dict(self.last_group_grams))

    def _edited_source_base_target_rows(self, plans, layouts) -> list[torch.Tensor]:
        """Per plan, its source rows by the text encoder holding ``text_edits`` (what the UNet
        will see) followed by its target rows by the base encoder (what the unedited model
        gives the replacement), each through the edit-row cache of its own encoder."""
        encoder = self.encoder
        sources = [([pr.source for pr in plan.pairs], s_pos) for plan, (s_pos, _) in zip(plans, layouts)]
        targets = [([pr.target for pr in plan.pairs], t_pos) for plan, (_, t_pos) in zip(plans, layouts)]
        source_rows = self.cache.edit_rows("context", encoder.components, sources, encoder.context_rows)
        if self._base_cache is None:
            self._base_cache = PreserveCache(self.model, self.preserve_cache, self.device)
        with self._base_text_encoders():
            target_rows = self._base_cache.edit_rows("context", encoder.components, targets, encoder.context_rows)
        return [torch.cat([s.to(self.device), t.to(self.device)]) for s, t in zip(source_rows, target_rows)]


class PreserveCache:
    """The preservation Gram cache for one compile, keyed by the content hash of the text
    encoder(s) involved; ``stats`` (hits, misses) goes into the manifest."""

    def __init__(self, model, enabled: bool | None, device: torch.device, text_edits: dict | None = None):
        from compiler.preserve_cache import CacheStats

        self.model, self.enabled, self.stats, self.device = model, enabled, CacheStats(), device
        self.row_stats = CacheStats()  # the edit-row cache's
        self._hashes: dict[str, str] = {}
        self.text_edits = text_edits or {}

    def _encoder_hash(self, components) -> tuple[str, bool | None]:
        """The encoders' content hashes and where their states were computed (a GPU's rows and
        Grams round differently from the CPU's: a cache must never mix them)."""
        from compiler.device import compute_tag
        from compiler.export.delta import base_tensors_sha256
        from compiler.preserve_cache import text_encoder_hash

        for component in components:
            if component not in self._hashes:
                base = text_encoder_hash(self.model, component)
                edits = {n: t for n, t in self.text_edits.items() if n.split("/", 1)[0] == component}
                if base and edits:  # an encoder holding this compile's text edits is another encoder
                    base += "+edit:" + base_tensors_sha256({n: t.cpu() for n, t in edits.items()})
                self._hashes[component] = base
        # An in-memory pipeline has no content hash: nothing to key a cache entry by.
        enabled = False if not all(self._hashes[c] for c in components) else self.enabled
        return "+".join(self._hashes[c] for c in components) + "@" + compute_tag(self.device), enabled

    def gram(self, kind: str, components, prompts, positions, rows):
        from compiler.preserve_cache import cached_gram

        encoder_hash, enabled = self._encoder_hash(components)
        return cached_gram(encoder_hash, kind, prompts, positions, rows, enabled=enabled, stats=self.stats)

    def edit_rows(self, kind: str, components, requests, compute):
        """Per request (an edit's prompts and positions) its rows, from the edit-row cache."""
        from compiler.preserve_cache import cached_edit_rows

        encoder_hash, enabled = self._encoder_hash(components)
        return cached_edit_rows(encoder_hash, kind, requests, compute, enabled=enabled, stats=self.row_stats)


def positions_by_prompt(tokenizer, plan, trailing_to: int | None = None):
    """Source and target token positions of each of the plan's prompt pairs."""
    edit = plan.edit
    return resolve.pair_positions(tokenizer, plan.pairs, edit.concept, edit.replacement, plan.eos, trailing_to,
                                  PADDING_LIMIT if trailing_to is not None else None)


def timed(timings: dict[str, float], key: str):
    """``with timed(t, "embed"): ...`` adds the block's seconds to ``t[key]``."""
    return _Timer(timings, key)


class _Timer:
    def __init__(self, timings: dict[str, float], key: str):
        self.timings, self.key = timings, key

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.start


def concept_weights(row_counts: list[int], lambdas: list[float], recipe_lam: float,
                    weighting: str = "concept") -> list[float]:
    """Per edit, the weight of each of its rows so that every concept counts equally in the one
    ridge solve, however many rows its templates make: ``(λ/λ_e) · (N / (E·n_e))`` for E edits
    of n_e rows (N in all). An edit's own λ_e keeps its meaning (a single edit's rows weigh
    ``λ/λ_e``, as before), and the total weight of all edit rows stays N.

    ``weighting="row"``: every row weighs ``λ/λ_e`` whatever its edit's row count (the rule
    before per-concept weights; the benchmark's scaling run measures both)."""
    if weighting == "row":
        return [recipe_lam / lam for lam in lambdas]
    if weighting != "concept":
        raise ValueError(f"concept weighting {weighting!r} is not 'concept' or 'row'")
    total, count = sum(row_counts), len(row_counts)
    return [(recipe_lam / lam) * (total / (count * n)) for n, lam in zip(row_counts, lambdas)]


def padding_share() -> float | None:
    """EDITC_PADDING_SHARE (experiment): the share of each edit's weight that its padding rows
    carry together (None: every row weighs the same)."""
    value = os.environ.get("EDITC_PADDING_SHARE")
    return float(value) if value else None


def row_weights(count: int, weight: float, padding: torch.Tensor | None) -> torch.Tensor:
    """The weight of each of an edit's ``count`` rows, ``weight`` each on average; with a
    padding share s, its padding rows together carry s of the edit's total and its own rows
    (subject, EOS) the rest."""
    share = padding_share()
    weights = torch.full((count,), weight, dtype=torch.float64)
    if share is None or padding is None or not bool(padding.any()) or bool(padding.all()):
        return weights
    total = weight * count
    n_pad = int(padding.sum())
    weights[padding] = share * total / n_pad
    weights[~padding] = (1 - share) * total / (count - n_pad)
    return weights


def solver_choice() -> str:
    return os.environ.get("EDITC_SOLVER", "ridge")


def held_directions(context: RowContext, rows: ContextRows) -> torch.Tensor:
    """The directions a constrained solve keeps exactly: what every generation shares (the
    start token's state, the empty prompt's 77 states: classifier-free guidance's
    unconditional context), plus the leading directions of the at-risk and replacement
    preservation rows."""
    from compiler.solve import held_basis, leading_directions

    encoder = context.encoder
    empty = encoder.contexts([""])[0].to(torch.float64)
    invariants = held_basis([empty])
    share = float(os.environ.get("EDITC_HOLD_SHARE", "0.99"))
    at_most = int(os.environ.get("EDITC_HOLD_RANK", "32"))
    grams = [g.gram for name, g in rows.groups.items() if name in ("at risk", "replacements")]
    parts = [invariants]
    if grams:
        gram = sum(grams)
        # What the invariants already hold is not counted again.
        project = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device) - invariants @ invariants.T
        parts.append(leading_directions(project @ gram @ project, share, at_most))
    return held_basis([p.T for p in parts])


PADDING_DIRECTIONS = 8


def padding_directions() -> int | None:
    """How many rows each prompt's padding positions become in a ridge solve: its
    ``PADDING_DIRECTIONS`` leading principal directions (README "Many concepts in one solve":
    the solve's statistics within 2e-4 of every padding row's, ~8× fewer rows, a 100-concept
    recipe in 1.2 GB instead of 7.6). ``EDITC_PADDING_DIRECTIONS`` overrides it (0: every
    padding row, the rule before issue 25)."""
    value = os.environ.get("EDITC_PADDING_DIRECTIONS")
    count = PADDING_DIRECTIONS if value is None or value == "" else int(value)
    return count if count > 0 else None


def leading_left_vectors(rows: torch.Tensor, directions: int, iterations: int = 2) -> torch.Tensor:
    """For each B × n × d block, an orthonormal n × k basis of (nearly) its leading left
    singular subspace: subspace iteration ``U ← qr(S Sᵀ U)`` started from the k lowest cosine
    modes over the positions (padding states drift smoothly after EOS). Two iterations leave
    1.6e-4 of the toy's padding energy out (an exact SVD: 2e-4 for 8 directions) at a tenth of
    the SVD's time, deterministically."""
    import math

    n = rows.shape[1]
    position = torch.arange(n, dtype=torch.float64, device=rows.device)
    start = torch.stack([torch.cos(math.pi * (position + 0.5) * j / n) for j in range(directions)], 1)
    basis = torch.linalg.qr(start)[0].expand(rows.shape[0], -1, -1)
    for _ in range(iterations):
        basis = torch.linalg.qr(rows @ (rows.transpose(1, 2) @ basis))[0]
    return basis


def compress_padding(source: torch.Tensor, target: torch.Tensor, per_prompt: list[int], own: int,
                     directions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each prompt's padding rows (after its first ``own`` rows) replaced by ``directions`` rows:
    with ``S = U Σ Vᵀ`` the prompt's source padding rows and ``T`` its target ones, the rows
    ``U_kᵀS`` and ``U_kᵀT`` (k leading left singular vectors, :func:`leading_left_vectors`). Their Gram and shift are the full
    rows' projected on the k directions that carry most of the prompt's padding states (their
    states drift smoothly after EOS: a few directions hold nearly all of them), so the solve
    sees nearly the same statistics from ~k instead of ~70 rows per prompt. Returns the new
    source and target rows and the mask of which are padding."""
    # Prompts with as many padding rows share one batched SVD.
    offsets = [0]
    for count in per_prompt:
        offsets.append(offsets[-1] + count)
    by_count: dict[int, list[int]] = {}
    for i, count in enumerate(per_prompt):
        if count - own > directions:
            by_count.setdefault(count, []).append(i)
    reduced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for count, members in by_count.items():
        index = torch.tensor([[offsets[i] + own + j for j in range(count - own)] for i in members])
        pad_s, pad_t = source[index].to(torch.float64), target[index].to(torch.float64)  # B × n × d
        u = leading_left_vectors(pad_s, directions)  # B × n × k
        rotated_s, rotated_t = u.transpose(1, 2) @ pad_s, u.transpose(1, 2) @ pad_t
        for j, i in enumerate(members):
            reduced[i] = (rotated_s[j].to(source.dtype), rotated_t[j].to(target.dtype))
    out_s, out_t, mask = [], [], []
    for i, count in enumerate(per_prompt):
        a, b = offsets[i], offsets[i + 1]
        head = min(own, count)
        out_s.append(source[a : a + head])
        out_t.append(target[a : a + head])
        mask += [False] * head
        if i in reduced:
            out_s.append(reduced[i][0])
            out_t.append(reduced[i][1])
            mask += [True] * directions
        else:
            out_s.append(source[a + head : b])
            out_t.append(target[a + head : b])
            mask += [True] * (count - head)
    return torch.cat(out_s), torch.cat(out_t), torch.tensor(mask)
