"""ADGEN generation metrics, as ChatGLM2's official ``compute_metrics`` and mindformers' ``ADGENMetric``.

Per example: ``hyp = jieba.cut(pred)``, ``ref = jieba.cut(label)``; rouge-1/2/l are the F scores of
``rouge_chinese.Rouge().get_scores(" ".join(hyp), " ".join(ref))``; bleu-4 is
``nltk sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)``
(characters). Each is x100 and rounded to 4 decimals per example, then averaged over examples.
An empty prediction (or reference) scores 0 on the rouge metrics (rouge_chinese refuses empty text).
numpy only: no torch, no MindSpore.
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np

__all__ = ["METRIC_NAMES", "example_scores", "compute_metrics", "ADGENMetric"]

METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _libs():
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge
    jieba.setLogLevel(logging.WARNING)
    return jieba, Rouge, sentence_bleu, SmoothingFunction


def example_scores(pred: str, label: str) -> dict[str, float]:
    """The four scores (x100, rounded to 4 decimals) of one prediction against one reference."""
    jieba, Rouge, sentence_bleu, SmoothingFunction = _libs()
    hyp = " ".join(jieba.cut(pred)).strip()
    ref = " ".join(jieba.cut(label)).strip()
    out = {}
    if hyp and ref:
        scores = Rouge().get_scores(hyp, ref)[0]
        for name in ("rouge-1", "rouge-2", "rouge-l"):
            out[name] = round(scores[name]["f"] * 100, 4)
    else:
        out.update({"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0})
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    out["bleu-4"] = round(float(bleu) * 100, 4)
    return out


def compute_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean of :func:`example_scores` over pairs: ``{"rouge-1", "rouge-2", "rouge-l", "bleu-4"}``."""
    m = ADGENMetric()
    m.update(predictions, references)
    return m.eval()


class ADGENMetric:
    """Accumulates examples batch by batch: ``update(preds, labels)``, then ``eval()``; ``clear()`` resets."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.scores: dict[str, list[float]] = {k: [] for k in METRIC_NAMES}

    def update(self, predictions: Iterable[str], references: Iterable[str]) -> None:
        predictions, references = list(predictions), list(references)
        if len(predictions) != len(references):
            raise ValueError(f"predictions: {len(predictions)} items but references has {len(references)}")
        for i, (p, r) in enumerate(zip(predictions, references)):
            if not isinstance(p, str) or not isinstance(r, str):
                raise TypeError(f"example {i}: predictions and references must be str")
            for k, v in example_scores(p, r).items():
                self.scores[k].append(v)

    def __len__(self) -> int:
        return len(self.scores["bleu-4"])

    def eval(self) -> dict[str, float]:
        if not len(self):
            raise ValueError("ADGENMetric: no examples (call update first)")
        return {k: float(np.mean(v)) for k, v in self.scores.items()}
