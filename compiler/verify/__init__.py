"""Verify: did each edit take, does it generalize, and did anything else break?

For every edit of a recipe, images are generated with fixed seeds from the base and the edited
model and scored by a judge (the toy world's CLIP, or a local CLIP folder for real models):

- ``probes``: which prompts (efficacy, generalization, specificity, generic) and what to look for;
- ``judges``: CLIP-scores and zero-shot identification, always with an unedited text tower;
- ``metrics``: batched generation and the per-group scores, base vs edited;
- ``gates``: the recipe's thresholds applied to the scores;
- ``report``: JSON, JUnit XML and a self-contained HTML page;
- ``run``: ``run_verify`` (pipelines in memory), ``verify_paths`` (what ``editc verify`` runs)
  and ``verify_compiled`` (what ``editc compile`` runs after export).
"""

from compiler.verify.gates import GateResult, evaluate_gates
from compiler.verify.judges import ClipFolderJudge, Judge, ToyWorldJudge, choose_judge
from compiler.verify.report import VerifyReport, html_report, junit_xml, write_reports
from compiler.verify.run import run_verify, verify_compiled, verify_paths

__all__ = [
    "ClipFolderJudge",
    "GateResult",
    "Judge",
    "ToyWorldJudge",
    "VerifyReport",
    "choose_judge",
    "evaluate_gates",
    "html_report",
    "junit_xml",
    "run_verify",
    "verify_compiled",
    "verify_paths",
    "write_reports",
]
