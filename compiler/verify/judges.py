"""Verify's judges are the one judge of ``compiler.judges`` (shared with locate); this module
keeps the names verify's callers import."""

from __future__ import annotations

from compiler.judges import (CLIP_TEMPLATES, NO_STYLE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, STYLE, SUBJECT,
                             ClipFolderJudge, Judge, choose_judge, is_toy_judge_folder, load_clip_folder_judge,
                             load_toy_world_judge, normalize_phrase, toy_judge_folder_for)

__all__ = [
    "CLIP_TEMPLATES", "NO_STYLE", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "STYLE", "SUBJECT", "ClipFolderJudge",
    "Judge", "ToyWorldJudge", "choose_judge", "is_toy_judge_folder", "load_clip_folder_judge",
    "load_toy_world_judge", "normalize_phrase", "toy_judge_folder_for",
]


def __getattr__(name: str):
    if name == "ToyWorldJudge":  # the toy's judge lives with the toy world
        from compiler.toy.judge import ToyWorldJudge

        return ToyWorldJudge
    raise AttributeError(name)
