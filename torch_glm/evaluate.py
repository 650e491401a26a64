"""Evaluation in PyTorch: eval loss, greedy answers scored by rouge/bleu, predictions.

The twin of ``mindspore_glm/evaluate.py``; the eval set, prompts, token budget and answer clean-up are
:mod:`glm_common.training`'s, the metrics :mod:`glm_common.metrics`'. A leaf module: ``train`` (eval
during training) and ``run`` import it.

With ``world > 1`` (an initialised ``torch.distributed`` group) every rank answers its own share of the
samples or texts (rank ``r`` of ``W`` takes items ``r, r+W, ...``); the answers are gathered over the
ranks (``all_gather_object``), in the order of the input.
"""
from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from glm_common.metrics import compute_metrics, perplexity
from glm_common.run_config import TrainSettings
from glm_common.training import (clean_answer, eval_loss_features, eval_prompts, eval_samples, format_table,
                                 generation_groups, label_tokens, merge_shards)
from torch_glm.checkpointing import base_model

__all__ = ["eval_samples", "eval_loss", "eval_perplexity", "evaluate", "predict", "gather_rows", "format_table"]


def gather_rows(rows: list, world: int) -> list:
    """Every rank's ``rows`` (picklable), on every rank, in rank order: ``[rows of rank 0, ...]``."""
    if world == 1:
        return [rows]
    out = [None] * world
    torch.distributed.all_gather_object(out, rows)
    return out


@torch.no_grad()
def eval_loss(model, s: TrainSettings, tokenizer, samples) -> float:
    """Teacher-forced loss over ``samples`` (:func:`eval_samples`), the mean over their label tokens, in
    batches of ``eval_dataset.batch_size``."""
    device = base_model(model).device
    feats = eval_loss_features(s, tokenizer, samples)
    total, count = 0.0, 0
    for lo in range(0, len(samples), s.eval_batch_size):
        ids = torch.from_numpy(feats["input_ids"][lo:lo + s.eval_batch_size]).to(device)
        labels = torch.from_numpy(feats["labels"][lo:lo + s.eval_batch_size]).to(device)
        n = label_tokens(feats["labels"][lo:lo + s.eval_batch_size])
        total += model(input_ids=ids, labels=labels).loss.item() * n
        count += n
    return total / max(1, count)


@torch.no_grad()
def eval_perplexity(model, s: TrainSettings, tokenizer, samples) -> dict:
    """``metric.type: PerplexityMetric``: ``{"loss", "PPL"}`` over ``samples`` as mindformers computes it
    (:func:`glm_common.metrics.perplexity`: the mean of the batches' mean token losses)."""
    device = base_model(model).device
    return perplexity(lambda ids, labels: model(input_ids=torch.from_numpy(ids).to(device),
                                                labels=torch.from_numpy(labels).to(device)).loss.item(),
                      eval_loss_features(s, tokenizer, samples), s.eval_batch_size)


@torch.no_grad()
def evaluate(model, s: TrainSettings, tokenizer, rank: int = 0, world: int = 1, samples=None) -> tuple:
    """Greedy answers for the eval set: ``(metrics, predictions, references)``; ``metrics`` has
    ``rouge-1``, ``rouge-2``, ``rouge-l``, ``bleu-4`` (x100, the official formula). With ``world > 1``
    this rank answers samples ``rank, rank+world, ...`` and every rank returns the gathered whole.
    ``samples``: :func:`eval_samples` already read (read here when None)."""
    base = base_model(model)
    device = base.device
    if samples is None:
        samples = eval_samples(s)
    ev, plan = eval_prompts(s, tokenizer, samples,
                            report=(lambda m: print(f"warning: {m}", file=sys.stderr)) if rank == 0 else None)
    preds = []
    bs = s.eval_batch_size
    mine = list(range(rank, len(samples), world))
    for lo in tqdm(range(0, len(mine), bs), desc="eval", disable=not s.progress or rank != 0):
        rows = mine[lo:lo + bs]
        answers = {}
        for sel, new in generation_groups(plan, rows, s.config.seq_length):
            prompt = torch.from_numpy(ev["input_ids"][sel]).to(device)
            out = base.generate(prompt, attention_mask=torch.from_numpy(ev["attention_mask"][sel]).to(device),
                                position_ids=torch.from_numpy(ev["position_ids"][sel]).to(device),
                                max_new_tokens=new, do_sample=False, eos_token_id=tokenizer.eos_token_id)
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
    base = base_model(model)
    out = []
    for q in list(queries)[rank::world]:
        response, _ = base.chat(tokenizer, q, max_length=o.max_decode_length, do_sample=o.do_sample,
                                top_k=o.top_k, top_p=o.top_p, temperature=1.0,
                                repetition_penalty=o.repetition_penalty, seed=s.seed)
        out.append({"query": q, "response": response})
    return merge_shards(gather_rows(out, world), len(queries))
