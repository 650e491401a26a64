"""Eval metrics, as mindformers names them in ``metric.type``: ``ADGENMetric`` (generation) and
``PerplexityMetric`` (teacher-forced loss).

``ADGENMetric``, as ChatGLM2's official ``compute_metrics`` and mindformers' ``ADGENMetric``:

Per example: ``hyp = jieba.cut(pred)``, ``ref = jieba.cut(label)``; rouge-1/2/l are the F scores of
``rouge_chinese.Rouge().get_scores(" ".join(hyp), " ".join(ref))``; bleu-4 is
``nltk sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)``
(characters). Each is x100 and rounded to 4 decimals per example, then averaged over examples.
An empty prediction (or reference) scores 0 on the rouge metrics (rouge_chinese refuses empty text).

``PerplexityMetric``, as mindformers' (``mindformers.core.metric.PerplexityMetric`` with its
``PerplexityCell``): each eval batch gives its loss, the mean cross entropy over the batch's label tokens
(``sum(nll * mask) / (sum(mask) + 1e-5)``, the shift by one done as in ``PerplexityCell``); the result is
``{"loss": mean of the batch losses, "PPL": exp(loss)}``. mindformers logs it as
``PerplexityMetric = {'PerplexityMetric': {'loss': ..., 'PPL': ...}}`` at the end of an eval run
(:func:`metric_log_line`), and ``Eval result: {...}, eval time is ... s.`` during training.

numpy only: no torch, no MindSpore.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = ["METRIC_NAMES", "METRIC_TYPES", "example_scores", "compute_metrics", "ADGENMetric", "PerplexityMetric",
           "metric_types", "perplexity", "metric_log_line"]

METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
#: the ``metric.type`` values this stack computes
METRIC_TYPES = ("ADGENMetric", "PerplexityMetric")


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


class PerplexityMetric:
    """mindformers' ``PerplexityMetric``: ``update(logits, labels, input_mask)`` per batch (or
    :meth:`update_loss` with a batch loss the model computed), then ``eval()`` -> ``{"loss", "PPL"}``.

    ``labels`` are aligned with the inputs (``-100`` where ignored), as both backends' models take them:
    position ``t``'s logits are scored against ``labels[t + 1]`` (``PerplexityCell``'s shift)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.total_loss, self.num_data = 0.0, 0

    @staticmethod
    def batch_loss(logits, labels, input_mask=None) -> float:
        """The batch's masked mean cross entropy (float64), as mindformers' ``CrossEntropyLoss``."""
        logits = np.asarray(logits, dtype=np.float64)[:, :-1]
        labels = np.asarray(labels)[:, 1:]
        mask = (labels != -100) if input_mask is None else np.asarray(input_mask)[:, 1:].astype(bool)
        safe = np.where(mask, labels, 0)
        top = logits.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
        nll = logz - np.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
        return float((nll * mask).sum() / (mask.sum() + 1e-5))

    def update(self, logits, labels, input_mask=None) -> None:
        self.update_loss(self.batch_loss(logits, labels, input_mask))

    def update_loss(self, loss: float) -> None:
        """One batch's mean token loss (what the model returns with ``labels``)."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"PerplexityMetric: batch {self.num_data}: loss is {loss}")
        self.total_loss += loss
        self.num_data += 1

    def __len__(self) -> int:
        return self.num_data

    def eval(self) -> dict[str, float]:
        if not self.num_data:
            raise ValueError("PerplexityMetric: no batches (call update first)")
        avg = self.total_loss / self.num_data
        return {"loss": float(avg), "PPL": float(math.exp(avg))}


def metric_types(value: Any, where: str = "metric.type") -> list:
    """``metric.type`` (a name, a list of names, or a list of ``{type: name}`` mappings, as mindformers
    accepts) -> the canonical names, in order; an unknown name raises ``ValueError`` naming ``where``."""
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        name = item.get("type") if isinstance(item, dict) else item
        known = {m.lower(): m for m in METRIC_TYPES}
        if not isinstance(name, str) or name.lower() not in known:
            at = f"{where}[{i}]" if isinstance(value, list) else where
            raise ValueError(f"{at}: expected one of {', '.join(METRIC_TYPES)} (ADGENMetric: rouge-1/2/l and "
                             f"bleu-4 of generated answers; PerplexityMetric: loss and PPL), got {name!r}")
        if known[name.lower()] not in out:
            out.append(known[name.lower()])
    if not out:
        raise ValueError(f"{where}: empty list of metrics")
    return out


def perplexity(batch_loss: Callable[[np.ndarray, np.ndarray], float], feats: dict, batch_size: int) -> dict:
    """:class:`PerplexityMetric` over ``feats`` (``input_ids``/``labels`` of
    :func:`glm_common.data.build_train_features`) in batches of ``batch_size``; ``batch_loss(ids, labels)``
    is the backend's forward returning the batch's mean token loss."""
    m = PerplexityMetric()
    n = len(feats["input_ids"])
    for lo in range(0, n, batch_size):
        m.update_loss(batch_loss(feats["input_ids"][lo:lo + batch_size], feats["labels"][lo:lo + batch_size]))
    return m.eval()


def metric_log_line(name: str, result: dict) -> str:
    """mindformers' end-of-eval log line: ``PerplexityMetric = {'PerplexityMetric': {'loss': .., 'PPL': ..}}``."""
    return f"{name} = {{{name!r}: {result!r}}}"
