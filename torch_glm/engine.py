"""Continuous batching over the KV cache: :class:`BatchDecoder` decodes many requests in one batch and
admits a new request at the next decode step.

A request joins with :meth:`BatchDecoder.add`: its prompt is run alone (the same prefill
:meth:`~torch_glm.generate.GenerationMixin.generate` runs, so the first new token is the one it would
pick) and its per-layer key/value cache is merged into the running batch cache, left-padded to the
longest row (padding columns are masked out). :meth:`BatchDecoder.step` then runs one decode step for
every row at once (``[B, 1]`` ids, each row its own position id, a ``[B, past + 1]`` attention mask)
and picks each row's next token with that row's own settings (ChatGLM2's NaN/Inf guard, the
repetition penalty over prompt and answer as ``generate`` applies it, OpenAI's presence/frequency
penalties over the answer, then temperature, top-k, top-p and a draw from the row's own seeded
``torch.Generator`` when sampling; argmax otherwise), exactly as ``generate`` does for one sequence.
With ``logprobs`` set, :meth:`BatchDecoder.logprobs` gives the chosen token's log-probability and the
``logprobs`` most likely tokens' under the model's own distribution (after the guard, before any
penalty or sampling setting), as vLLM reports them. :meth:`BatchDecoder.remove` drops a
finished or abandoned row at once and trims cache columns no row uses any more. A row whose token
choice fails (its own settings) gets the exception in place of its token; the other rows go on.

Prefix cache (``prefix_cache`` entries, 0: off): a row that leaves keeps its keys/values (prompt and
answer) under its token ids, least recently used dropped first; a prompt that starts with the ids of a
kept entry (a chat's next turn) prefills only its new tokens after that entry's keys/values
(:attr:`BatchDecoder.reused_tokens` counts the tokens not run again). Off for P-tuning models.

The twin :mod:`mindspore_glm.engine` has the same class and methods over MindSpore's static cache.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import torch

from glm_common.generation import common_start, presence_frequency_penalty, prompt_logprobs
from torch_glm.generate import (apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p,
                                invalid_score_processor, sample_next)

__all__ = ["BatchDecoder", "SamplingSettings"]


@dataclass
class SamplingSettings:
    """One request's token choice: greedy unless ``do_sample``; ``seed`` makes sampling reproducible."""
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None       # None: none; k: the chosen token's and the k most likely


class _Row:
    __slots__ = ("pending", "position", "settings", "generator", "ids", "prompt_len", "logprobs")

    def __init__(self, pending: int, position: int, settings: SamplingSettings, generator, ids=()):
        self.pending, self.position, self.settings, self.generator = pending, position, settings, generator
        self.ids, self.prompt_len, self.logprobs = list(ids), len(ids), None


class BatchDecoder:
    """Batched greedy/sampled decoding with requests joining and leaving between steps.

    ``model``: a :class:`torch_glm.model.ChatGLM2ForConditionalGeneration` (LoRA merged); ``max_batch``:
    rows decoded together. Keys are any hashable the caller picks (one per request).
    """

    def __init__(self, model, max_batch: int = 8, prefix_cache: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be at least 1, got {max_batch}")
        self.model = model
        self.prefix_cache = 0 if getattr(model.config, "pre_seq_len", None) else int(prefix_cache)
        self.kept: OrderedDict = OrderedDict()     # token ids -> per layer (key, value) [1, g, T, hn]
        self.reused_tokens = 0
        self.max_batch = int(max_batch)
        self.device = model.device
        self.keys: list = []                 # batch row order
        self.rows: dict = {}
        self.past = None                     # per layer (key, value) [B, g, T, hn], rows right-aligned
        self.mask: Optional[torch.Tensor] = None   # [B, T]: 1 for a filled column, 0 for left padding

    # ------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        return len(self.keys)

    @property
    def free(self) -> int:
        """Rows that can still join."""
        return self.max_batch - len(self.keys)

    def __contains__(self, key) -> bool:
        return key in self.rows

    # ------------------------------------------------------------------ token choice
    def _pick(self, row: _Row, scores: torch.Tensor) -> int:
        """``scores [1, V]`` float32 -> the row's next token (as ``generate`` picks it)."""
        s = row.settings
        scores = invalid_score_processor(None, scores)   # the guard reads the scores only
        logp = scores.log_softmax(-1) if s.logprobs is not None else None
        if s.repetition_penalty != 1.0:
            scores = apply_repetition_penalty(torch.tensor([row.ids], device=scores.device), scores,
                                              s.repetition_penalty)
        scores = presence_frequency_penalty(scores, row.ids[row.prompt_len:], s.presence_penalty, s.frequency_penalty)
        if s.do_sample:
            scores = apply_top_p(apply_top_k(apply_temperature(scores, s.temperature), s.top_k), s.top_p)
        tok = int(sample_next(scores, s.do_sample, row.generator)[0])
        if logp is not None:
            top = torch.topk(logp[0], s.logprobs) if s.logprobs else None
            row.logprobs = (float(logp[0, tok]), [] if top is None else
                            [(int(i), float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())])
        row.ids.append(tok)
        return tok

    def logprobs(self, key: Hashable):
        """``(log-probability of the last token chosen, [(token, log-probability)] of the most likely)``
        for a row whose settings ask for ``logprobs``; ``None`` otherwise."""
        return self.rows[key].logprobs

    @torch.no_grad()
    def prompt_logprobs(self, prompt_ids: Sequence[int], k: int = 0) -> list:
        """Each prompt token's log-probability given the tokens before it, and the ``k`` most likely there
        (:func:`glm_common.generation.prompt_logprobs`), from one forward pass over the prompt alone; the
        rows decoding are not touched."""
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids).logits[0].float().cpu().numpy()
        return prompt_logprobs(logits, list(prompt_ids), k)

    # ------------------------------------------------------------------ join / leave
    @torch.no_grad()
    def add(self, key: Hashable, prompt_ids: Sequence[int], settings: Optional[SamplingSettings] = None,
            max_new_tokens: Optional[int] = None) -> int:
        """Prefill ``prompt_ids`` alone and return the first new token; the row decodes from the next
        :meth:`step` on. ``max_new_tokens`` is accepted for the twin's sake (this cache grows as needed).
        Raises ``RuntimeError`` when the batch is full, ``KeyError`` for a key in use."""
        if key in self.rows:
            raise KeyError(f"{key!r}: already decoding")
        if not self.free:
            raise RuntimeError(f"the batch is full ({self.max_batch} rows)")
        settings = settings or SamplingSettings()
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        n = ids.shape[1]
        m, past = self._reuse(list(prompt_ids))
        out = self.model(input_ids=ids[:, m:], attention_mask=torch.ones_like(ids),
                         position_ids=torch.arange(m, n, device=self.device)[None], past_key_values=past,
                         use_cache=True, return_last_logit=True)
        self.reused_tokens += m
        generator = None
        if settings.do_sample and settings.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(settings.seed))
        row = _Row(0, n, settings, generator, prompt_ids)
        first = self._pick(row, out.logits[:, -1].float())
        row.pending = first
        present = out.past_key_values
        self._merge(present, torch.ones(1, present[0][0].shape[2], dtype=torch.long, device=self.device))
        self.keys.append(key)
        self.rows[key] = row
        return first

    def _merge(self, present, mask_row: torch.Tensor) -> None:
        if self.past is None:
            self.past, self.mask = tuple(present), mask_row
            return
        t, n = self.mask.shape[1], mask_row.shape[1]
        if n < t:
            present = tuple((_pad_left(k, t - n), _pad_left(v, t - n)) for k, v in present)
            mask_row = _pad_left(mask_row, t - n)
        elif n > t:
            self.past = tuple((_pad_left(k, n - t), _pad_left(v, n - t)) for k, v in self.past)
            self.mask = _pad_left(self.mask, n - t)
        self.past = tuple((torch.cat([k, pk]), torch.cat([v, pv])) for (k, v), (pk, pv) in zip(self.past, present))
        self.mask = torch.cat([self.mask, mask_row])

    def _reuse(self, ids: list):
        """``(m, past)``: the keys/values of the longest start ``ids`` shares with a kept entry (at most
        ``len(ids) - 1`` tokens, so one is left to run), or ``(0, None)``."""
        best, m = None, 0
        for kept in self.kept:
            k = common_start(kept, ids)
            if k > m:
                best, m = kept, k
        m = min(m, len(ids) - 1)
        if best is None or m < 1:
            return 0, None
        self.kept.move_to_end(best)
        return m, tuple((k[:, :, :m], v[:, :, :m]) for k, v in self.kept[best])

    def _keep(self, i: int, row: _Row) -> None:
        """Keep row ``i``'s keys/values (its ids but the pending last one) for later prompts."""
        cols = self.mask[i].bool()
        ids = tuple(row.ids[:-1])
        if int(cols.sum()) != len(ids) or len(ids) < 2:
            return
        self.kept[ids] = tuple((k[i:i + 1][:, :, cols].clone(), v[i:i + 1][:, :, cols].clone()) for k, v in self.past)
        self.kept.move_to_end(ids)
        while len(self.kept) > self.prefix_cache:
            self.kept.popitem(last=False)

    def remove(self, key: Hashable) -> None:
        """Drop a row now (finished or abandoned); unknown keys are ignored."""
        if key not in self.rows:
            return
        i = self.keys.index(key)
        if self.prefix_cache:
            self._keep(i, self.rows[key])
        del self.rows[key]
        self.keys.pop(i)
        if not self.keys:
            self.past = self.mask = None
            return
        keep = torch.tensor([j for j in range(len(self.keys) + 1) if j != i], device=self.device)
        mask = self.mask[keep]
        first = int(mask.any(0).long().argmax())      # columns only the dropped row used
        self.mask = mask[:, first:]
        self.past = tuple((k[keep, :, first:], v[keep, :, first:]) for k, v in self.past)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def step(self) -> dict:
        """One decode step for every row: ``{key: next token}`` (an exception for a row whose token
        choice failed; the caller removes that row)."""
        if not self.keys:
            return {}
        rows = [self.rows[k] for k in self.keys]
        ids = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.position] for r in rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.past,
                         use_cache=True, return_last_logit=True)
        self.past, self.mask = out.past_key_values, mask
        scores = out.logits[:, -1].float()
        result = {}
        for i, (key, row) in enumerate(zip(self.keys, rows)):
            try:
                tok = self._pick(row, scores[i:i + 1])
            except Exception as e:                       # noqa: BLE001 - this row fails, the others go on
                result[key] = e
                continue
            row.pending, row.position = tok, row.position + 1
            result[key] = tok
        return result


def _pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """Prepend ``n`` zero columns on the sequence axis (axis 2 of a cache, axis 1 of a mask)."""
    axis = 2 if x.dim() == 4 else 1
    shape = list(x.shape)
    shape[axis] = n
    return torch.cat([x.new_zeros(shape), x], dim=axis)
