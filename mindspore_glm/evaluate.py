"""Evaluation in MindSpore: eval loss, greedy answers scored by rouge/bleu, predictions.

The twin of ``torch_glm/evaluate.py``; the eval set, prompts, token budget and answer clean-up are
:mod:`glm_common.training`'s, the metrics :mod:`glm_common.metrics`'. A leaf module: ``train`` (eval
during training) and ``run`` (``run_mode eval|predict``) both import it.

With ``world > 1`` every rank holds the whole model and answers its own share of the samples or texts
(rank ``r`` of ``W`` takes items ``r, r+W, ...``); the answers are gathered over the ranks
(``AllGather``; no shared file system needed), in the order of the input.
"""
from __future__ import annotations

import json
import sys

import numpy as np
from mindspore import Tensor, ops
from tqdm.auto import tqdm

from glm_common.metrics import compute_metrics, perplexity
from glm_common.run_config import TrainSettings
from glm_common.training import (clean_answer, eval_loss_features, eval_prompts, eval_samples, format_table,
                                 generation_groups, label_tokens, merge_shards)

__all__ = ["eval_samples", "eval_loss", "eval_perplexity", "evaluate", "predict", "gather_rows", "format_table"]


def gather_rows(rows: list, world: int) -> list:
    """Every rank's ``rows`` (JSON-serialisable), on every rank, in rank order: ``[rows of rank 0, ...]``.

    The rows travel as UTF-8 JSON bytes through ``AllGather`` (padded to the longest rank's), so the
    ranks need no shared file system."""
    if world == 1:
        return [rows]
    data = json.dumps(rows, ensure_ascii=False).encode("utf-8")
    sizes = ops.AllGather()(Tensor(np.array([len(data)], np.int32))).asnumpy().reshape(-1)
    width = -(-int(sizes.max()) // 4) * 4
    buf = np.frombuffer(data.ljust(width, b"\0"), np.int32).reshape(1, -1)
    got = ops.AllGather()(Tensor(buf)).asnumpy()
    return [json.loads(got[r].tobytes()[:int(sizes[r])].decode("utf-8")) for r in range(world)]


def eval_loss(model, s: TrainSettings, tokenizer, samples) -> float:
    """Teacher-forced loss over ``samples`` (:func:`eval_samples`), the mean over their label tokens, in
    batches of ``eval_dataset.batch_size``."""
    feats = eval_loss_features(s, tokenizer, samples)
    total, count = 0.0, 0
    for lo in range(0, len(samples), s.eval_batch_size):
        ids = feats["input_ids"][lo:lo + s.eval_batch_size].astype(np.int32)
        labels = feats["labels"][lo:lo + s.eval_batch_size].astype(np.int32)
        n = label_tokens(labels)
        total += float(model(Tensor(ids), None, None, Tensor(labels))[0].asnumpy()) * n
        count += n
    return total / max(1, count)


def eval_perplexity(model, s: TrainSettings, tokenizer, samples) -> dict:
    """``metric.type: PerplexityMetric``: ``{"loss", "PPL"}`` over ``samples`` as mindformers computes it
    (:func:`glm_common.metrics.perplexity`: the mean of the batches' mean token losses)."""
    return perplexity(lambda ids, labels: float(model(Tensor(ids.astype(np.int32)), None, None,
                                                      Tensor(labels.astype(np.int32)))[0].asnumpy()),
                      eval_loss_features(s, tokenizer, samples), s.eval_batch_size)


def evaluate(model, s: TrainSettings, tokenizer, rank: int = 0, world: int = 1, samples=None) -> tuple:
    """Greedy answers for the eval set: ``(metrics, predictions, references)``; ``metrics`` has
    ``rouge-1``, ``rouge-2``, ``rouge-l``, ``bleu-4`` (x100, the official formula). With ``world > 1``
    this rank answers samples ``rank, rank+world, ...`` and every rank returns the gathered whole.
    ``samples``: :func:`eval_samples` already read (read here when None)."""
    if samples is None:
        samples = eval_samples(s)
    ev, plan = eval_prompts(s, tokenizer, samples,
                            report=(lambda m: print(f"warning: {m}", file=sys.stderr)) if rank == 0 else None)
    preds = []
    bs = s.eval_batch_size
    mine = np.arange(rank, len(samples), world)
    for lo in tqdm(range(0, len(mine), bs), desc="eval", disable=not s.progress or rank != 0):
        rows = mine[lo:lo + bs]
        answers = {}
        for sel, new in generation_groups(plan, rows, s.config.seq_length):
            prompt = ev["input_ids"][sel]
            out = model.generate(prompt, attention_mask=ev["attention_mask"][sel],
                                 position_ids=ev["position_ids"][sel], max_new_tokens=new, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id)
            for r, row in zip(sel, out[:, prompt.shape[1]:].tolist()):
                answers[int(r)] = tokenizer.decode(clean_answer(tokenizer, row[:int(plan.new_tokens[r])]))
        preds.extend(answers[int(r)] for r in rows)
    preds = merge_shards(gather_rows(preds, world), len(samples))
    return compute_metrics(preds, ev["answers"]), preds, list(ev["answers"])


def predict(model, s: TrainSettings, tokenizer, queries, rank: int = 0, world: int = 1) -> list:
    """``[{"query", "response"}, ...]`` with the model_config's generation settings (``max_decode_length``
    is the total length, prompt included, as mindformers reads it). With ``world > 1`` this rank answers
    queries ``rank, rank+world, ...`` and every rank returns the gathered whole."""
    o = s.options
    out = []
    for q in list(queries)[rank::world]:
        response, _ = model.chat(tokenizer, q, max_length=o.max_decode_length, do_sample=o.do_sample,
                                 top_k=o.top_k, top_p=o.top_p, temperature=1.0,
                                 repetition_penalty=o.repetition_penalty, seed=s.seed)
        out.append({"query": q, "response": response})
    return merge_shards(gather_rows(out, world), len(queries))
