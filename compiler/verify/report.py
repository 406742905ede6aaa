"""Verify's results and the three files written from them.

- ``verify.json``: every number: gates, per-group scores of both models, per-image samples.
- ``junit.xml``: one test case per gate, failures named and explained, for CI systems.
- ``report.html``: one static, self-contained page (images inlined as base64 PNG): the gates,
  then per edit a table of scores and, for each group, base and edited images side by side
  for the same prompts and seeds.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from compiler import __version__
from compiler.errors import UserError
from compiler.verify.gates import GateResult
from compiler.verify.metrics import GroupResult, ModelScores

JSON_NAME = "verify.json"
JUNIT_NAME = "junit.xml"
HTML_NAME = "report.html"


@dataclass
class VerifyReport:
    recipe_path: str
    recipe_sha256: str
    edits: list[dict]  # concept, replacement, attribute
    base_model: dict
    edited_model: dict
    judge: str
    settings: dict
    groups: list[GroupResult]
    gates: list[GateResult]
    timings_seconds: dict[str, float]
    # The base model's images: "cached" (an earlier verify's, from the editc cache),
    # "generated" (and stored there) or "generated (cache off)".
    base_images: str = "generated"
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def passed(self) -> bool:
        return not self.failed_gates

    @property
    def failed_gates(self) -> list[GateResult]:
        return [gate for gate in self.gates if gate.failed]

    def groups_of(self, edit_index: int | None) -> list[GroupResult]:
        return [group for group in self.groups if group.edit_index == edit_index]

    def to_dict(self) -> dict:
        """Everything but the images, JSON-ready."""
        return _rounded({
            "tool": {"name": "editc", "version": __version__},
            "created": self.created,
            "passed": self.passed,
            "failed_gates": [gate.name for gate in self.failed_gates],
            "recipe": {"path": self.recipe_path, "sha256": self.recipe_sha256},
            "models": {"base": self.base_model, "edited": self.edited_model},
            "base": self.base_images,
            "judge": self.judge,
            "settings": self.settings,
            "gates": [{**asdict(gate), "failed": gate.failed} for gate in self.gates],
            "edits": [
                {"index": index, **edit, "groups": {g.name: _group_dict(g) for g in self.groups_of(index)}}
                for index, edit in enumerate(self.edits)
            ],
            "generic": next((_group_dict(g) for g in self.groups_of(None)), None),
            "timings_seconds": self.timings_seconds,
        })


def _change(base: ModelScores, edited: ModelScores) -> dict:
    def delta(name):
        before, after = getattr(base, name), getattr(edited, name)
        return None if before is None or after is None else after - before

    return {name: delta(name) for name in ("accuracy", "replacement_accuracy", "clip_prompt", "clip_target")}


def _group_dict(group: GroupResult) -> dict:
    return {
        "description": group.description,
        "prompts": group.prompts,
        "seeds": group.seeds,
        "images": len(group.samples),
        "base": asdict(group.base),
        "edited": asdict(group.edited),
        "change": _change(group.base, group.edited),
        "feature_distance": group.feature_distance,
        "subjects": [asdict(s) for s in group.subjects],
        "samples": [asdict(s) for s in group.samples],
    }


def _rounded(value):
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# JUnit XML
# --------------------------------------------------------------------------------------------


def _value_text(gate: GateResult) -> str:
    if gate.threshold is None:
        return f"{gate.value:.3f} (no threshold)"
    return f"{gate.value:.3f} (must be {gate.comparison} {gate.threshold:g})"


def junit_xml(report: VerifyReport) -> str:
    """One ``<testcase>`` per gate; failures carry the gate's message."""
    suite_name = f"editc verify {report.recipe_path}"
    total_time = sum(report.timings_seconds.values())
    failures = len(report.failed_gates)
    skipped = sum(gate.skipped for gate in report.gates)
    counts = {"tests": str(len(report.gates)), "failures": str(failures), "errors": "0",
              "skipped": str(skipped), "time": f"{total_time:.3f}"}
    root = ET.Element("testsuites", {"name": "editc verify", **counts})
    suite = ET.SubElement(root, "testsuite", {"name": suite_name, "timestamp": report.created, **counts})
    properties = ET.SubElement(suite, "properties")
    for name, value in (("recipe", report.recipe_path), ("recipe_sha256", report.recipe_sha256),
                        ("base_model", report.base_model.get("path", "")),
                        ("edited_model", report.edited_model.get("path", "")), ("judge", report.judge),
                        ("base", report.base_images),
                        ("seeds", str(len(report.settings["seeds"]))), ("steps", str(report.settings["steps"])),
                        ("guidance_scale", str(report.settings["guidance_scale"]))):
        ET.SubElement(properties, "property", {"name": name, "value": str(value)})
    classname = "editc.verify." + Path(report.recipe_path).stem
    for gate in report.gates:
        case = ET.SubElement(suite, "testcase", {"classname": classname, "name": gate.name, "time": "0"})
        detail = f"{gate.metric}: {_value_text(gate)}\n{gate.message}"
        if gate.skipped:
            ET.SubElement(case, "skipped", {"message": gate.message})
        elif gate.failed:
            failure = ET.SubElement(case, "failure", {"message": f"{gate.name}: {gate.message}", "type": "GateFailed"})
            failure.text = detail
        else:
            ET.SubElement(case, "system-out").text = detail
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

STRIP_HEIGHT = 64  # pixels per image in the HTML strips
MARK_HEIGHT = 4  # the bar under each image: the judge sees the prompt's subject (or not)
SUBJECT_SEEN = np.array([232, 125, 20], np.uint8)
SUBJECT_NOT_SEEN = np.array([215, 215, 215], np.uint8)

_CSS = """
body { font: 14px/1.4 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222;
       max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 6px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 4px; }
.verdict { display: inline-block; padding: 3px 12px; border-radius: 4px; color: #fff; font-weight: 600; }
.pass { background: #1a7f37; } .fail { background: #cf222e; } .skip { background: #8c959f; }
.meta { color: #555; font-size: 13px; margin: 6px 0 14px; } .meta code { font-size: 12px; }
table { border-collapse: collapse; margin: 6px 0 10px; }
th, td { border: 1px solid #d8dee4; padding: 4px 8px; text-align: left; vertical-align: middle; }
th { background: #f6f8fa; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.prompt { max-width: 330px; font-size: 13px; } .pill { padding: 1px 8px; border-radius: 10px; color: #fff;
       font-size: 12px; font-weight: 600; }
.images td { padding: 3px 6px; } .images img { image-rendering: pixelated; display: block; }
.count { font-size: 12px; color: #444; white-space: nowrap; }
.legend { font-size: 12px; color: #555; } .swatch { display: inline-block; width: 14px; height: 4px;
       vertical-align: middle; margin: 0 2px; }
.desc { color: #555; font-size: 13px; margin: 2px 0 6px; }
"""


def _png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _resize_for_strip(image: np.ndarray) -> np.ndarray:
    """Small images (the toy model's 32×32) grow by whole pixels; large ones shrink smoothly."""
    height = image.shape[0]
    if height <= STRIP_HEIGHT:
        factor = max(1, STRIP_HEIGHT // height)
        return image.repeat(factor, 0).repeat(factor, 1)
    from PIL import Image

    width = round(image.shape[1] * STRIP_HEIGHT / height)
    return np.asarray(Image.fromarray(image).resize((width, STRIP_HEIGHT), Image.LANCZOS))


def image_strip(images: np.ndarray, subject_seen: list[bool], gap: int = 3) -> np.ndarray:
    """Images side by side, each with a bar beneath: orange when the judge sees the subject."""
    tiles = []
    for image, seen in zip(images, subject_seen):
        tile = _resize_for_strip(image)
        mark = np.empty((MARK_HEIGHT, tile.shape[1], 3), np.uint8)
        mark[:] = SUBJECT_SEEN if seen else SUBJECT_NOT_SEEN
        spacer = np.full((1, tile.shape[1], 3), 255, np.uint8)
        tiles.append(np.concatenate([tile, spacer, mark]))
    height = max(t.shape[0] for t in tiles)
    gap_column = np.full((height, gap, 3), 255, np.uint8)
    pieces = []
    for index, tile in enumerate(tiles):
        if index:
            pieces.append(gap_column)
        pieces.append(tile)
    return np.concatenate(pieces, axis=1)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _arrow(before: float | None, after: float | None, fmt) -> str:
    if before is None or after is None:
        return "–"
    return f"{fmt(before)} → <b>{fmt(after)}</b>"


def _status_pill(gate: GateResult, label: str = "") -> str:
    prefix = f"{html.escape(label)}: " if label else ""
    if gate.skipped:
        return f'<span class="pill skip">{prefix}REPORTED</span>'
    if gate.passed:
        return f'<span class="pill pass">{prefix}PASS</span>'
    return f'<span class="pill fail">{prefix}FAIL</span>'


def _gates_table(gates: list[GateResult]) -> str:
    rows = []
    for gate in gates:
        threshold = "not gated" if gate.threshold is None else f"{gate.comparison} {gate.threshold:g}"
        rows.append(f"<tr><td>{_status_pill(gate)}</td><td><code>{html.escape(gate.name)}</code></td>"
                    f'<td class="num">{gate.value:.3f}</td><td>{html.escape(threshold)}</td>'
                    f"<td>{html.escape(gate.message)}</td></tr>")
    return ("<table><tr><th>status</th><th>gate</th><th>measured</th><th>threshold</th><th>what was seen</th></tr>"
            + "".join(rows) + "</table>")


def _scores_table(groups: list[GroupResult], clip_label: str) -> str:
    rows = []
    for group in groups:
        b, e = group.base, group.edited
        rows.append(
            f"<tr><td>{group.name}</td><td class='num'>{len(group.samples)}</td>"
            f"<td class='num'>{_arrow(b.accuracy, e.accuracy, _pct)}</td>"
            f"<td class='num'>{_arrow(b.replacement_accuracy, e.replacement_accuracy, _pct)}</td>"
            f"<td class='num'>{_arrow(b.clip_prompt, e.clip_prompt, _num)}</td>"
            f"<td class='num'>{_arrow(b.clip_target, e.clip_target, _num)}</td>"
            f"<td class='num'>{group.feature_distance:.3f}</td></tr>")
    return ("<table><tr><th>group</th><th>images</th><th>judge sees the prompt's subject<br>base → edited</th>"
            "<th>judge sees the replacement<br>base → edited</th>"
            f"<th>{clip_label} vs prompt<br>base → edited</th><th>{clip_label} vs replacement prompt<br>base → edited</th>"
            "<th>feature distance<br>base ↔ edited</th></tr>" + "".join(rows) + "</table>")


def _subjects_table(group: GroupResult) -> str:
    if len(group.subjects) < 2:
        return ""
    cells = "".join(
        f"<tr><td>{html.escape(s.subject)}</td><td class='num'>{s.images}</td>"
        f"<td class='num'>{_arrow(s.base_accuracy, s.edited_accuracy, _pct)}</td></tr>" for s in group.subjects)
    return ("<table><tr><th>subject</th><th>images</th><th>judge sees it: base → edited</th></tr>"
            + cells + "</table>")


def _images_table(group: GroupResult) -> str:
    seeds = len(group.seeds)
    rows = []
    for p, prompt in enumerate(group.prompts):
        samples = group.samples[p * seeds : (p + 1) * seeds]
        cells = []
        for role, images in (("base", group.base_images), ("edited", group.edited_images)):
            scores = [getattr(s, role) for s in samples]
            seen = [s.shows_subject for s in scores]
            strip = image_strip(images[p * seeds : (p + 1) * seeds], seen)
            title = "; ".join(f"seed {s.seed}: judge sees {getattr(s, role).label}" for s in samples)
            count = f"{sum(seen)}/{len(seen)}"
            if scores[0].shows_replacement is not None:
                replaced = sum(bool(s.shows_replacement) for s in scores)
                count = f"concept {count}<br>replacement {replaced}/{len(scores)}"
            cells.append(f'<td><img alt="{role} images" title="{html.escape(title)}" '
                         f'src="data:image/png;base64,{_png_base64(strip)}"></td>'
                         f'<td class="count">{count}</td>')
        rows.append(f'<tr><td class="prompt">{html.escape(prompt)}</td>{"".join(cells)}</tr>')
    subject_note = "judge sees"
    return ('<table class="images"><tr><th>prompt</th><th>base model (seeds '
            f'{", ".join(map(str, group.seeds))})</th><th>{subject_note}</th><th>edited model (same seeds)</th>'
            f"<th>{subject_note}</th></tr>" + "".join(rows) + "</table>")


def _group_section(group: GroupResult) -> str:
    return (f"<h3>{html.escape(group.name)}</h3><div class='desc'>{html.escape(group.description)}</div>"
            + _subjects_table(group) + _images_table(group))


def html_report(report: VerifyReport) -> str:
    settings = report.settings
    clip_label = "CLIP-score ×100" if settings.get("clip_scale") == 100 else "CLIP-score"
    verdict = ('<span class="verdict pass">PASSED</span>' if report.passed
               else f'<span class="verdict fail">FAILED: {len(report.failed_gates)} of {len(report.gates)} gates</span>')
    meta = (
        f"recipe <code>{html.escape(report.recipe_path)}</code> (sha256 {report.recipe_sha256[:12]})<br>"
        f"base <code>{html.escape(str(report.base_model.get('path')))}</code> "
        f"{html.escape(str(report.base_model.get('sha256', ''))[:12])} · "
        f"edited <code>{html.escape(str(report.edited_model.get('path')))}</code> "
        f"{html.escape(str(report.edited_model.get('sha256', ''))[:12])}<br>"
        f"judge: {html.escape(report.judge)}<br>"
        f"base: {html.escape(report.base_images)}<br>"
        f"{len(settings['seeds'])} seeds per prompt, {settings['steps']} steps, guidance {settings['guidance_scale']:g}, "
        f"{settings['images_per_model']} images per model · {html.escape(report.created)}"
        + _compute_line(settings.get("compute"))
    )
    legend = (f'<div class="legend">Under each image, a bar: <span class="swatch" style="background:#e87d14"></span>'
              f' the judge sees the prompt\'s subject (in efficacy and generalization: the concept the edit should '
              f'remove), <span class="swatch" style="background:#d7d7d7"></span> it does not. '
              f"Hover a strip for the judge's label of each image.</div>")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>editc verify: "
             f"{html.escape(report.recipe_path)}</title><style>{_CSS}</style></head><body>",
             f"<h1>editc verify {verdict}</h1><div class='meta'>{meta}</div>",
             "<h2>Gates</h2>", _gates_table(report.gates)]
    for index, edit in enumerate(report.edits):
        groups = report.groups_of(index)
        pills = " ".join(_status_pill(g, g.name.split(".")[-1]) for g in report.gates if g.edit_index == index)
        parts.append(f"<h2>edits[{index}]: {html.escape(edit['concept'])} → {html.escape(edit['replacement'])} "
                     f"<small>({html.escape(edit['attribute'])})</small> {pills}</h2>")
        parts.append(_scores_table(groups, clip_label))
        parts.append(legend)
        parts.extend(_group_section(group) for group in groups)
    generic = report.groups_of(None)
    if generic:
        pills = " ".join(_status_pill(g, g.name.split(".")[-1]) for g in report.gates if g.edit_index is None)
        parts.append(f"<h2>generic prompts {pills}</h2>")
        parts.append(_scores_table(generic, clip_label))
        parts.extend(_group_section(group) for group in generic)
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_seconds.items())
    parts.append(f"<p class='meta'>editc {__version__} · {timings}</p></body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_reports(report: VerifyReport, directory: str | Path, *, force: bool = False) -> dict[str, Path]:
    """Write verify.json, junit.xml and report.html into ``directory`` (created if needed).

    Existing report files are only replaced with ``force``. Returns the paths by kind.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: --report must be a folder, and this is a file")
    paths = {"json": directory / JSON_NAME, "junit": directory / JUNIT_NAME, "html": directory / HTML_NAME}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]}: already exists; pass --force to overwrite the reports or choose another --report")
    from compiler.io import write_atomically

    write_atomically(paths["json"], json.dumps(report.to_dict(), indent=2) + "\n", force=True)
    write_atomically(paths["junit"], junit_xml(report), force=True)
    write_atomically(paths["html"], html_report(report), force=True)
    return paths


def _compute_line(compute: dict | None) -> str:
    """Where the images were made: device, GPU and generation dtype (``compiler.device``)."""
    if not compute:
        return ""
    where = compute.get("gpu") or compute.get("device", "")
    return (f"<br>computed on {html.escape(str(where))} ({html.escape(str(compute.get('device', '')))}), "
            f"images in {html.escape(str(compute.get('generation_dtype', '')))}")
