"""The one judge (compiler.judges): locate and verify score images the same way."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from compiler.judges import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, STYLE, SUBJECT, ClipFolderJudge
from compiler.prompts import real_vocabulary


def _judge(vocabulary=None) -> ClipFolderJudge:
    return ClipFolderJudge(None, None, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "pixels only", vocabulary=vocabulary)


def test_clip_folder_judge_preprocesses_as_clips_own_image_processor():
    """Resize the short side and centre-crop (CLIPImageProcessor), not squash to a square."""
    from transformers import CLIPImageProcessor

    small = np.random.default_rng(0).integers(0, 256, (6, 5, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(small).resize((40, 48), Image.BICUBIC))  # 48 high, 40 wide
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    reference = torch.tensor(np.asarray(processor(images=[image], return_tensors="np").pixel_values))
    ours = _judge()._pixels(image[None].copy())
    assert ours.shape == reference.shape == (1, 3, 32, 32)
    assert float((ours - reference).abs().max()) < 0.05  # resampling kernels differ slightly
    squashed = np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC))
    squashed = (torch.from_numpy(squashed.copy()).permute(2, 0, 1).float() / 255
                - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    assert float((squashed - reference[0]).abs().max()) > 0.5  # what locate's copy used to do


def test_clip_folder_judge_labels_come_from_the_vocabulary():
    judge = _judge(real_vocabulary())
    styles = judge.vocabulary_labels(STYLE)
    subjects = judge.vocabulary_labels(SUBJECT)
    assert len(styles) >= 200 and "claude monet" in styles
    assert "snoopy" in subjects and "a dog" in subjects and "king charles iii" in subjects
    assert judge.kind_of("Claude Monet") == STYLE and judge.kind_of("snoopy") == SUBJECT
    assert judge.label_of("the british monarch", SUBJECT) == "queen elizabeth ii"
