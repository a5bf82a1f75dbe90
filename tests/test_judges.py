"""benchmarks/judges.py: the caption-accuracy and Fréchet-distance judges of issue 17,
on a hand-made classifier and a randomly initialised CNN (no training, no MNIST)."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
from torch import nn

from tests.helpers import REPO

pytest.importorskip("torchmetrics")


def _load_judges():
    spec = importlib.util.spec_from_file_location("judges", REPO / "benchmarks" / "judges.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("judges", module)
    spec.loader.exec_module(module)
    return module


judges = _load_judges()


class GreyLevelClassifier(nn.Module):
    """Classifies an image filled with grey level k (0-9, in uint8 units) as digit k."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x.float().mean(dim=(1, 2, 3)).round().long()
        return nn.functional.one_hot(level, 10).float()


def test_caption_accuracy_on_a_hand_made_case():
    levels = torch.tensor([0, 1, 1, 1, 2, 2])
    captions = torch.tensor([0, 0, 1, 1, 1, 2])
    images = levels.to(torch.uint8)[:, None, None, None].expand(-1, 1, 28, 28)
    result = judges.caption_accuracy(GreyLevelClassifier(), images, captions)
    assert result["per_caption"] == pytest.approx({0: 0.5, 1: 2 / 3, 2: 1.0})
    assert result["count"] == {0: 2, 1: 3, 2: 1}
    assert result["mean"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    histogram = judges.class_histogram(GreyLevelClassifier(), images)
    assert histogram[:3] == pytest.approx([1 / 6, 3 / 6, 2 / 6]) and sum(histogram[3:]) == 0


def test_caption_accuracy_refuses_mismatched_captions():
    with pytest.raises(ValueError, match="captions"):
        judges.caption_accuracy(GreyLevelClassifier(), torch.zeros(3, 1, 28, 28), torch.zeros(2))


def test_frechet_distance_is_zero_to_itself_and_grows_with_a_shift():
    torch.manual_seed(0)
    classifier = judges.DigitClassifier().eval()
    images = torch.rand(300, 1, 28, 28) * 0.6
    same = judges.frechet_distance(classifier, images, images)
    shifted = judges.frechet_distance(classifier, images + 0.3, images)
    more = judges.frechet_distance(classifier, images + 0.4, images)
    assert math.isfinite(same) and abs(same) < 1e-3 * shifted
    assert 0 < shifted < more
    # uint8 and [0, 1] floats are judged alike
    as_bytes = (images * 255).round().to(torch.uint8)
    assert judges.frechet_distance(classifier, as_bytes, images) < 1e-2 * shifted
