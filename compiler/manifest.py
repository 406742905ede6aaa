"""The manifest of a compile (``manifest.json`` in every output) and the provenance strings that
every exported file's safetensors ``__metadata__`` carries."""

from __future__ import annotations


def build_manifest(recipe, model, result, timings: dict[str, float], outputs: dict) -> dict:
    import hashlib

    from compiler import __version__, resolve

    vocabulary = resolve.vocabulary_of(model, recipe.vocabulary)
    preserve = getattr(result, "preserve_prompts", [])
    groups = getattr(result, "preserve_groups", [])
    return {
        "tool": {"name": "editc", "version": __version__},
        "recipe": {"path": str(recipe.path), "sha256": recipe.sha256, "text": recipe.source_text},
        "base_model": {"path": str(model.source_path), "sha256": model.model_hash, "family": model.family,
                       "format": model.source_format},
        "lambda": recipe.lambda_,
        "edits": edit_entries(result.plans),
        "vocabulary": {"name": vocabulary.name, "source": vocabulary.source},
        "preservation": {
            "prompts": len(preserve),
            "sha256": hashlib.sha256("\n".join(preserve).encode()).hexdigest(),
            "named": sorted({*recipe.preserve, *(n for p in result.plans for n in p.edit.preserve)}),
            "neighbours": list(dict.fromkeys(n.phrase for p in result.plans for n in p.neighbours)),
            "groups": [{"name": g.name, "prompts": len(g.prompts), "weight": g.weight,
                        "examples": list(g.prompts[:4])} for g in groups],
            "captions_examples": next((list(g.prompts[:8]) for g in groups if g.name == "captions"), preserve[:8]),
        },
        "solves": result.solve_info,
        "edited_tensors": sorted(result.new_tensors),
        "timings_seconds": {k: round(v, 4) for k, v in timings.items()},
        "outputs": outputs,
    }


def edit_entries(plans) -> list[dict]:
    """Per planned edit: what, how (and why), where (and from where)."""
    return [
        {"concept": p.edit.concept, "replacement": p.edit.replacement, "attribute": p.edit.attribute,
         "method": p.method, "method_reason": p.method_reason, "layers": list(p.layers),
         "layers_source": p.layers_source.value, "layers_reason": p.layers_reason,
         "prompt_pairs": len(p.pairs), "lambda": p.lam, "eos": p.eos,
         **p.method_plugin.describe(p),
         "prompt_examples": [pair.source for pair in p.pairs[:: max(1, len(p.pairs) // 6)][:6]],
         "neighbours": [n.to_dict() for n in p.neighbours]}
        for p in plans
    ]


def provenance_for(manifest: dict) -> dict[str, str]:
    """Strings for safetensors ``__metadata__``: what was done to this file, and to what."""
    from compiler.export.provenance import provenance_metadata

    return provenance_metadata(
        recipe_text=manifest["recipe"]["text"],
        base_model_sha256=manifest["base_model"]["sha256"],
        edited_tensors=manifest["edited_tensors"],
        method=",".join(sorted({e["method"] for e in manifest["edits"]})),
        lam=manifest["lambda"],
        layers=sorted({j for e in manifest["edits"] for j in e["layers"]}),
        # No timings here: identical inputs must give byte-identical files (they are in the manifest).
    )
