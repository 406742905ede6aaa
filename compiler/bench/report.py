"""The benchmark's report: rows per method and edit, the speed ratios, the Markdown tables
(as in the README) and the JSON and Markdown files."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch

from compiler.bench.settings import (CLOSED_FORM, FINE_TUNING, LABELS, REFERENCE_STEPS, SHORT_LABELS, TASKS,
                                     BenchSettings)


def method_rows(runs: dict, quality: dict, settings: BenchSettings) -> list[dict]:
    rows = []
    for kind in settings.kinds:
        task = TASKS[kind]
        for method in settings.methods:
            if (kind, method) not in runs:
                continue
            results = runs[(kind, method)]
            seconds = [r.seconds for r in results]
            info = dict(results[-1].info)
            rows.append({
                "kind": kind, "concept": task.concept, "replacement": task.replacement, "method": method,
                "label": LABELS[method], "family": "fine-tuning" if method in FINE_TUNING else "closed form",
                "seconds": seconds, "median_seconds": statistics.median(seconds),
                "median_cpu_seconds": statistics.median(r.info["cpu_seconds"] for r in results),
                "edited_tensors": len(results[-1].new_tensors), "info": _jsonable(info),
                "quality": quality.get((kind, method)),
            })
    return rows


def ratios(rows: list[dict]) -> dict:
    """Fine-tuning time over closed-form time, per kind, for every closed-form method; also with
    the fine-tuning extrapolated to the papers' step counts (its measured time per step)."""
    out = {}
    by = {(r["kind"], r["method"]): r for r in rows}
    for (kind, method), row in by.items():
        if method not in CLOSED_FORM:
            continue
        for tuner in FINE_TUNING:
            ft = by.get((kind, tuner))
            if ft is None:
                continue
            per_step = ft["info"]["seconds_per_step"]
            fixed = ft["median_seconds"] - per_step * ft["info"]["steps"]  # e.g. anchor images
            at_reference = fixed + per_step * REFERENCE_STEPS[tuner]
            out.setdefault(kind, {}).setdefault(method, {})[tuner] = {
                "measured": ft["median_seconds"] / row["median_seconds"],
                "measured_cpu": ft["median_cpu_seconds"] / row["median_cpu_seconds"],
                "at_paper_steps": at_reference / row["median_seconds"],
                "fine_tuning_seconds": ft["median_seconds"], "fine_tuning_steps": ft["info"]["steps"],
                "fine_tuning_seconds_at_paper_steps": at_reference, "paper_steps": REFERENCE_STEPS[tuner],
                "closed_form_seconds": row["median_seconds"],
            }
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _fmt(x, digits=2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _delta(scores: dict) -> str:
    return f"{scores['edited'] - scores['base'] + 0.0:+.2f}"  # + 0.0: no "-0.00"


def _seconds(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.3f}"


def markdown(report: dict) -> str:
    """The README tables: methods × edits, the speed ratios, and scaling."""
    rows = report["methods"]
    ratio = report["ratios"]
    lines = []
    host = report["host"]
    where = f"GPU {host['gpu']}" if host.get("gpu") else f"{host['torch_threads']} CPU thread(s)"
    if report.get("load_average_at_end"):
        where += f" (machine load average {report['load_average_at_end'][1]:.1f} over the last 5 min of the run)"
    lines.append(f"Model {report['model']['family']} ({Path(report['model']['path']).name}), {where}, "
                 f"{report['settings']['repeats']} interleaved "
                 f"repeats of each closed-form edit (median); quality by `compiler.verify` "
                 f"({report['settings']['verify_seeds']} seeds × {report['settings']['verify_prompts']} prompts per "
                 f"group, {report['settings']['verify_steps']} DDIM steps).")
    lines.append("")
    lines.append("| Edit | Method | Time (s) | ESD-x ÷ this | CA ÷ this | Efficacy | Generalization | "
                 "Neighbours acc. (Δ) | Generic acc. (Δ) | Gates |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in report["settings"]["kinds"]:
        kind_rows = [r for r in rows if r["kind"] == kind]
        if not kind_rows:
            continue
        first = kind_rows[0]
        edit = f"{kind}: {first['concept']} → {first['replacement']}"
        q0 = next((r["quality"] for r in kind_rows if r["quality"]), None)
        if q0:
            lines.append(f"| {edit} | *base model* | | | | {_fmt(q0['efficacy']['base'])} | "
                         f"{_fmt(q0['generalization']['base'])} | {_fmt(q0['neighbours']['base'])} | "
                         f"{_fmt(q0['generic']['base'])} | |")
        for r in kind_rows:
            q = r["quality"] or {}
            rr = ratio.get(kind, {}).get(r["method"], {})
            esd = rr.get("esd-x", {}).get("measured")
            ca = rr.get("concept-ablation", {}).get("measured")
            cells = [
                edit if not q0 else "", r["label"], _seconds(r["median_seconds"]),
                f"{esd:,.0f}×" if esd else "", f"{ca:,.0f}×" if ca else "",
                _fmt(q.get("efficacy", {}).get("edited")), _fmt(q.get("generalization", {}).get("edited")),
                f"{_fmt(q['neighbours']['edited'])} ({_delta(q['neighbours'])})" if "neighbours" in q else "–",
                f"{_fmt(q['generic']['edited'])} ({_delta(q['generic'])})" if "generic" in q else "–",
                f"{q['gates_passed']}/{q['gates_total']}" if q else "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Efficacy / generalization: share of images (solve templates / held-out paraphrases) in which "
                 "the edit took — the judge no longer sees the concept (style, object) or sees the new fact "
                 "(fact). Neighbours / generic: the judge's accuracy on neighbouring concepts / generic object "
                 "prompts after the edit, Δ vs the base model. Gates: verify's default gates passed.")
    summary = ratio_summary(report)
    if summary:
        lines.append("")
        lines.extend(summary)
    if report.get("scaling"):
        lines.append("")
        lines.append("| Concepts in one recipe | Edit rows | Compile (s) | of which solve (s) | "
                     "Efficacy / generalization on the real concepts | Their neighbours (base → edited) | "
                     "Generic (base → edited) |")
        lines.append("|---:|---:|---:|---:|---|---|---|")
        for row in report["scaling"]:
            verified = row.get("concepts_verified") or {}
            if verified:
                eff = ", ".join(f"{c} {v['efficacy']:.2f} / {v['generalization']:.2f}" for c, v in verified.items())
                near = ", ".join(f"{c} {v['neighbour_accuracy']['base']:.2f} → {v['neighbour_accuracy']['edited']:.2f}"
                                 for c, v in verified.items() if v["neighbour_accuracy"])
            else:
                eff, near = ", ".join(f"{c} {v['edited']:.2f}" for c, v in row["efficacy"].items()), ""
            generic = row.get("generic_accuracy")
            generic = f"{generic['base']:.2f} → {generic['edited']:.2f}" if generic else ""
            lines.append(f"| {row['concepts']} | {row['rows']:,} | {_seconds(row['compile_seconds_median'])} | "
                         f"{_seconds(row['solve_seconds_median'])} | {eff} | {near} | {generic} |")
    return "\n".join(lines) + "\n"


def ratio_summary(report: dict) -> list[str]:
    rows = report["methods"]
    by = {(r["kind"], r["method"]): r for r in rows}
    lines = []
    for tuner in FINE_TUNING:
        for method in ("locoedit", "quickfix", "quickfix-v"):
            measured, paper, cpu = [], [], []
            for kind in report["settings"]["kinds"]:
                rr = report["ratios"].get(kind, {}).get(method, {}).get(tuner)
                if rr:
                    measured.append((kind, rr["measured"]))
                    paper.append(rr["at_paper_steps"])
                    cpu.append(rr.get("measured_cpu"))
            if not measured:
                continue
            ft = [by[(k, tuner)] for k, _ in measured]
            steps = ft[0]["info"]["steps"]
            per_step = statistics.fmean(r["info"]["seconds_per_step"] for r in ft)
            lines.append(
                f"- {LABELS[method]} vs {SHORT_LABELS[tuner]} ({steps} steps here, {per_step:.3f} s/step): "
                + ", ".join(f"{k} {m:,.0f}×" for k, m in measured)
                + " faster in wall time (" + ", ".join(f"{c:,.0f}×" for c in cpu if c) + " in CPU time); at the "
                + f"papers' {REFERENCE_STEPS[tuner]} steps: " + ", ".join(f"{p:,.0f}×" for p in paper) + ".")
    return lines


def write_report(report: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    for path, text in ((json_path, json.dumps(_jsonable(report), indent=1) + "\n"), (md_path, markdown(report))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return json_path, md_path
