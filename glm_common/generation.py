"""Generation rules both backends apply: ChatGLM2's invalid-score guard, OpenAI's presence/frequency
penalties (the serving engines), the new-token budget of
``generate``/``chat``, and the per-sample budget of eval generation.

Backend-free (numpy or any tensor with ``isfinite``/``new_zeros``); ``mindspore_glm.generate`` and
``torch_glm.generate`` re-export :func:`invalid_score_processor` and call the budget functions; both
backends' ``evaluate`` plan their eval prompts with :func:`plan_eval_prompts` (through
:func:`glm_common.training.eval_prompts`).

The eval budget: mindformers' ``generate(input_ids, max_length=max_decode_length)`` gives every sample of a batch the
same *total* length: ``max_length`` (``model_config.max_decode_length``), clamped to ``seq_length``; a
sample stops when its own prompt plus its new tokens reach it. Here the new tokens are also bounded by
``max_new_tokens`` (the eval set's ``max_target_length``: its answers are cut to that length). So each
sample's budget follows its own prompt length, not the padded width of the batch or the configured
``max_source_length``.

A prompt that alone leaves no room (``len >= max_length``) is refused by mindformers' generator; its eval
dataset is what keeps prompts short, by keeping their head (``prompt[:max_source_length - 1]``). Here
such a prompt keeps its first ``max_length - 1`` tokens (the ``[gMASK] sop`` prefix and the start of the
text) and gets one new token; :func:`plan_generation` counts them so the caller reports them once.

Left-padded batches (this stack's) give every row the positions ``0 .. len - 1`` and then one more per
step, so a batch generated for ``n`` new tokens needs ``len + n <= seq_length`` on every row (the rotary
table has ``seq_length`` rows). :func:`budget_groups` splits an eval batch into the fewest groups of
rows (by prompt length) that each fit when generated together for their largest budget; each row is
then cut to its own budget, which is what mindformers' per-sample stop does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from glm_common.prompt import INVALID_SCORE_TOKEN, INVALID_SCORE_VALUE

__all__ = ["INVALID_SCORE_TOKEN", "INVALID_SCORE_VALUE", "invalid_score_processor", "presence_frequency_penalty",
           "prompt_logprobs", "common_start",
           "new_token_budget",
           "chat_token_budget", "GenerationPlan", "plan_generation", "budget_groups", "apply_plan",
           "plan_eval_prompts"]


def invalid_score_processor(input_ids, scores):
    """ChatGLM2's ``InvalidScoreLogitsProcessor``: when any score of ``scores [B, V]`` is NaN/Inf, every
    score becomes 0 and token 5 gets 5e4. ``input_ids`` (the tokens so far) is the logits-processor
    interface's first argument and unused. Works on numpy arrays and torch tensors alike."""
    if hasattr(scores, "new_zeros"):                      # a torch tensor
        if bool(scores.isfinite().all()):
            return scores
        out = scores.new_zeros(scores.shape)
    else:
        if np.isfinite(scores).all():
            return scores
        out = np.zeros_like(scores)
    out[..., INVALID_SCORE_TOKEN] = INVALID_SCORE_VALUE
    return out


def presence_frequency_penalty(scores, answer_ids: Sequence[int], presence: float, frequency: float):
    """OpenAI's penalties on ``scores [1, V]`` (numpy or torch, not modified): every token the answer so
    far holds ``c > 0`` times loses ``frequency * c + presence`` (the prompt does not count)."""
    if not answer_ids or (not presence and not frequency):
        return scores
    ids, counts = np.unique(np.asarray(answer_ids, np.int64), return_counts=True)
    penalty = frequency * counts.astype(np.float32) + presence
    out = scores.clone() if hasattr(scores, "clone") else np.array(scores, copy=True)
    if hasattr(out, "new_tensor"):
        out[0, ids.tolist()] -= out.new_tensor(penalty)
    else:
        out[0, ids] -= penalty
    return out


def prompt_logprobs(logits: np.ndarray, ids: Sequence[int], k: int = 0) -> list:
    """``logits [S, V]`` of one forward pass over the prompt ``ids`` -> per prompt token, the model's
    log-probability of it given the tokens before it and the ``k`` most likely tokens there:
    ``[None, (logprob, [(token, logprob), ...]), ...]`` (the first token has nothing before it: ``None``, as
    OpenAI's ``echo`` with ``logprobs`` reports it)."""
    x = np.asarray(logits[:len(ids) - 1], np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    out: list = [None]
    for i in range(1, len(ids)):
        row = logp[i - 1]
        top = np.argsort(-row, kind="stable")[:k] if k else ()
        out.append((float(row[ids[i]]), [(int(t), float(row[t])) for t in top]))
    return out


def common_start(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (the serving engines' prefix cache)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def new_token_budget(prompt_len: int, max_new_tokens: Optional[int] = None, max_length: Optional[int] = None) -> int:
    """How many tokens ``generate`` may add: ``max_new_tokens``, else what ``max_length`` (prompt + new)
    leaves after ``prompt_len``; ``<= 0`` means none. One of the two is required (``ValueError``)."""
    if max_new_tokens is not None:
        return int(max_new_tokens)
    if max_length is None:
        raise ValueError("generate: give max_new_tokens or max_length")
    return int(max_length) - int(prompt_len)


def chat_token_budget(prompt_len: int, max_new_tokens: Optional[int], max_length: Optional[int],
                      seq_length: int, caller: str = "chat") -> int:
    """``chat``/``stream_chat``'s budget: :func:`new_token_budget`, bounded so that every position stays
    inside the model's ``seq_length``. Raises ``ValueError`` (naming ``caller``) when no token fits."""
    budget = min(new_token_budget(prompt_len, max_new_tokens, max_length), int(seq_length) - int(prompt_len) - 1)
    if budget <= 0:
        raise ValueError(f"{caller}: the prompt has {prompt_len} tokens, no room left under "
                         f"max_length {max_length} / seq_length {seq_length}")
    return budget


@dataclass
class GenerationPlan:
    """Per-sample budgets: ``lengths`` (prompt tokens after truncation), ``new_tokens`` (each sample's
    budget), ``max_length`` (the total each sample may reach), ``truncated`` (indices of the prompts
    cut to fit)."""

    lengths: np.ndarray
    new_tokens: np.ndarray
    max_length: int
    truncated: list

    def message(self, what: str = "eval prompts") -> Optional[str]:
        """The one line that reports the truncated prompts (None when there are none)."""
        if not self.truncated:
            return None
        return (f"{len(self.truncated)} of {len(self.lengths)} {what} leave no room to generate within "
                f"max_length {self.max_length} (min of max_decode_length and seq_length); kept their first "
                f"{self.max_length - 1} tokens, as mindformers' eval dataset keeps the head of a long prompt")


def plan_generation(lengths: Sequence[int], seq_length: int, max_decode_length: Optional[int] = None,
                    max_new_tokens: Optional[int] = None) -> GenerationPlan:
    """Budgets for prompts of ``lengths`` real tokens.

    Each sample may reach ``max_length = min(max_decode_length, seq_length)`` tokens in all (mindformers
    clamps ``max_length`` to ``seq_length``); ``max_new_tokens`` (the eval set's ``max_target_length``,
    the length its answers are cut to) bounds the new tokens too. A sample's budget is
    ``min(max_length, len + max_new_tokens) - len``; a prompt with ``len >= max_length`` keeps its first
    ``max_length - 1`` tokens.
    """
    lengths = np.asarray(lengths, dtype=np.int64).copy()
    cap = seq_length if max_decode_length is None else min(int(max_decode_length), int(seq_length))
    if cap < 2:
        raise ValueError(f"max_decode_length {max_decode_length} / seq_length {seq_length}: no room for a "
                         "prompt and a new token")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens}")
    over = np.flatnonzero(lengths >= cap)
    lengths[over] = cap - 1
    totals = np.full_like(lengths, cap)
    if max_new_tokens is not None:
        totals = np.minimum(totals, lengths + int(max_new_tokens))
    return GenerationPlan(lengths=lengths, new_tokens=totals - lengths, max_length=cap,
                          truncated=[int(i) for i in over])


def budget_groups(lengths: Sequence[int], new_tokens: Sequence[int], seq_length: int) -> list:
    """Rows (indices into ``lengths``) grouped so that each group, generated together for its largest
    budget, keeps every row within ``seq_length`` positions: ``max(len) + max(new) <= seq_length``.

    Rows are taken in order of prompt length; a group closes when the next row would break the rule.
    Returns ``[(row indices, new tokens of the group), ...]``; one group when everything fits."""
    lengths, new_tokens = np.asarray(lengths), np.asarray(new_tokens)
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), i))
    groups, cur, hi_len, hi_new = [], [], 0, 0
    for i in order:
        L, n = int(lengths[i]), int(new_tokens[i])
        if cur and max(hi_len, L) + max(hi_new, n) > seq_length:
            groups.append((cur, hi_new))
            cur, hi_len, hi_new = [], 0, 0
        cur.append(i)
        hi_len, hi_new = max(hi_len, L), max(hi_new, n)
    if cur:
        groups.append((cur, hi_new))
    return groups


def apply_plan(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
               plan: GenerationPlan, pad_token_id: int = 0) -> tuple:
    """Left-padded prompt arrays ``[N, P]`` with each truncated row cut to ``plan.lengths`` (its head
    kept, as mindformers keeps the head of a long prompt); other rows are copied as they are."""
    ids, mask, pos = input_ids.copy(), attention_mask.copy(), position_ids.copy()
    P = ids.shape[1]
    real = attention_mask.sum(axis=1)
    for i in plan.truncated:
        k, keep = int(real[i]), int(plan.lengths[i])
        head = input_ids[i, P - k:P - k + keep].copy()
        ids[i], mask[i], pos[i] = pad_token_id, 0, 0
        ids[i, P - keep:], mask[i, P - keep:], pos[i, P - keep:] = head, 1, np.arange(keep)
    return ids, mask, pos


def plan_eval_prompts(ev: dict, seq_length: int, max_decode_length: int, pad_token_id: int = 0,
                      report=None, max_new_tokens: Optional[int] = None) -> tuple:
    """The eval prompts of :func:`glm_common.data.build_eval_features` (``ev``) with mindformers' budget:
    ``(ev with truncated rows cut, plan)``. ``report`` (e.g. ``print``) gets the one line about truncated
    prompts, once. Generate each eval batch ``rows`` with :func:`budget_groups` on
    ``plan.lengths[rows]`` / ``plan.new_tokens[rows]`` and keep ``plan.new_tokens[r]`` tokens of row ``r``."""
    plan = plan_generation(ev["attention_mask"].sum(axis=1), seq_length, max_decode_length, max_new_tokens)
    ids, mask, pos = apply_plan(ev["input_ids"], ev["attention_mask"], ev["position_ids"], plan, pad_token_id)
    msg = plan.message()
    if msg and report is not None:
        report(msg)
    return {**ev, "input_ids": ids, "attention_mask": mask, "position_ids": pos}, plan
