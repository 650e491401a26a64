"""Continuous batching over the static KV cache: :class:`BatchDecoder` decodes many requests in one batch
and admits a new request at the next decode step.

MindSpore compiles one graph per shape, so the batch cache has a fixed shape between changes:
``[B, g, L, hn]`` per layer, ``B`` a power of two up to ``max_batch`` (grown when a request finds no
free row, shrunk when half the rows are free), ``L`` a multiple of ``cache_block``. Every decode step
writes all rows' new key/value at the same column ``t`` (the model's ``decode`` takes one ``slot``), so
each row's entries are kept right-aligned at ``t``: a request joining with ``n`` prompt entries
(P-tuning prefix included) has them placed in columns ``t - n .. t - 1`` of a free row (the cache is
first shifted right when ``t < n``, or left to drop columns no row needs when ``L`` would overflow).
The ``cache_mask`` marks each row's own columns; position ids are per row.

:meth:`BatchDecoder.add` runs the prompt alone through the model's ``prefill`` (as ``generate`` does)
and picks the first token; :meth:`BatchDecoder.step` runs ``decode`` for every row at once and picks
each row's token with that row's own settings (``process_logits`` with the repetition penalty over
prompt and answer, OpenAI's presence/frequency penalties over the answer, and ``sample_next`` with the
row's own ``numpy`` generator seeded by its ``seed``), as ``generate`` does for one sequence. With
``logprobs`` set, :meth:`BatchDecoder.logprobs` gives the chosen token's log-probability and the
``logprobs`` most likely tokens' under the model's own distribution (after the guard, before any
penalty or sampling setting).
:meth:`BatchDecoder.remove` frees a row at once. A row whose token choice fails (its own settings) gets
the exception in place of its token; the other rows go on. The twin :mod:`torch_glm.engine` has the
same API.

Prefix cache (``prefix_cache`` entries, 0: off): a row that leaves keeps its keys/values (prompt and
answer) under its token ids, least recently used dropped first; a prompt that starts with the ids of a
kept entry (a chat's next turn) runs only its new tokens through the model's ``prefill_after`` over that
entry's keys/values (:attr:`BatchDecoder.reused_tokens` counts the tokens not run again). Off for
P-tuning models.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import numpy as np

from glm_common.generation import common_start, invalid_score_processor, presence_frequency_penalty, prompt_logprobs
from mindspore_glm.generate import process_logits, sample_next

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
    __slots__ = ("pending", "position", "settings", "rng", "index", "length", "end", "ids", "prompt_len", "logprobs")

    def __init__(self, pending, position, settings, rng, index, length, end, ids=()):
        self.pending, self.position, self.settings, self.rng = pending, position, settings, rng
        self.index, self.length, self.end = index, length, end
        self.ids, self.prompt_len, self.logprobs = list(ids), len(ids), None


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class BatchDecoder:
    """Batched greedy/sampled decoding with requests joining and leaving between steps.

    ``model``: a :class:`mindspore_glm.model.ChatGLM2ForConditionalGeneration` (its ``use_graph`` and
    ``cache_block`` apply); ``max_batch``: rows decoded together. Keys are any hashable the caller picks.
    """

    def __init__(self, model, max_batch: int = 8, prefix_cache: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be at least 1, got {max_batch}")
        self.model = model
        self.prefix_cache = 0 if model.pre_seq_len else int(prefix_cache)
        self.kept: OrderedDict = OrderedDict()     # token ids -> per layer (key, value) [1, g, T, hn]
        self.reused_tokens = 0
        self._after_fn = None
        self.max_batch = int(max_batch)
        self.block = int(getattr(model, "cache_block", 64))
        self.p = int(model.pre_seq_len or 0)
        self.seq_length = int(model.config.seq_length)
        self.rows: dict = {}
        self.slots: list = []          # key per batch row (None = free)
        self.caches = None             # per layer (key, value) [B, g, L, hn]
        self.cache_mask = np.zeros((0, 0), np.int32)
        self.t = 0                     # the column the next decode step writes
        self._fns = None

    # ------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        """Rows that can still join."""
        return self.max_batch - len(self.rows)

    def __contains__(self, key) -> bool:
        return key in self.rows

    @property
    def keys(self) -> list:
        return [k for k in self.slots if k is not None]

    def _functions(self):
        """The model's compiled ``prefill``/``decode`` (shared with its ``generate``: one compile per shape)."""
        if self._fns is None and hasattr(self.model, "_generation_fns"):
            self._fns = self.model._generation_fns()
        if self._fns is None:
            import mindspore as ms
            model = self.model

            def prefill_fn(input_ids, attention_mask, position_ids):
                return model.prefill(input_ids, attention_mask, position_ids)

            def decode_fn(input_ids, position_ids, cache_mask, slot, kv_caches):
                return model.decode(input_ids, position_ids, cache_mask, slot, kv_caches)

            if getattr(model, "use_graph", True):
                prefill_fn, decode_fn = ms.jit(prefill_fn), ms.jit(decode_fn)
            self._fns = (prefill_fn, decode_fn)
        return self._fns

    # ------------------------------------------------------------------ token choice
    @staticmethod
    def _pick(row: _Row, scores: np.ndarray) -> int:
        """``scores [1, V]`` float32 -> the row's next token (as ``generate`` picks it)."""
        s = row.settings
        scores = invalid_score_processor(None, np.array(scores, np.float32))
        logp = None
        if s.logprobs is not None:
            shifted = scores - scores.max(-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        scores = process_logits(scores, np.asarray([row.ids], np.int64), s.repetition_penalty)   # not sampling yet
        scores = presence_frequency_penalty(scores, row.ids[row.prompt_len:], s.presence_penalty, s.frequency_penalty)
        if s.do_sample:
            scores = process_logits(scores, np.zeros((1, 0), np.int64), 1.0, s.temperature, s.top_k, s.top_p, True)
        tok = int(sample_next(scores, s.do_sample, row.rng)[0])
        if logp is not None:
            top = np.argsort(-logp[0], kind="stable")[:s.logprobs]
            row.logprobs = (float(logp[0, tok]), [(int(i), float(logp[0, i])) for i in top])
        row.ids.append(tok)
        return tok

    def logprobs(self, key: Hashable):
        """``(log-probability of the last token chosen, [(token, log-probability)] of the most likely)``
        for a row whose settings ask for ``logprobs``; ``None`` otherwise."""
        return self.rows[key].logprobs

    # ------------------------------------------------------------------ cache layout
    def _zeros(self, b, length, like):
        from mindspore import ops
        return ops.zeros((b, like.shape[1], length, like.shape[3]), like.dtype)

    def _columns(self, start: int, stop: int, offset: int, new_len: int) -> None:
        """Move columns ``start..stop-1`` to ``offset..`` of a cache of ``new_len`` columns (zeros elsewhere)."""
        from mindspore import ops
        width = stop - start

        def move(x):
            parts = []
            if offset:
                parts.append(self._zeros(x.shape[0], offset, x))
            if width:
                parts.append(x[:, :, start:stop])
            if new_len - offset - width:
                parts.append(self._zeros(x.shape[0], new_len - offset - width, x))
            return parts[0] if len(parts) == 1 else ops.concat(parts, 2)

        self.caches = tuple((move(k), move(v)) for k, v in self.caches)
        mask = np.zeros((self.cache_mask.shape[0], new_len), np.int32)
        mask[:, offset:offset + width] = self.cache_mask[:, start:stop]
        self.cache_mask = mask

    def _resize_batch(self, b: int) -> None:
        """Grow to ``b`` rows (zeros) or keep the used rows first and cut to ``b``."""
        from mindspore import Tensor, ops
        old = len(self.slots)
        if b > old:
            self.caches = tuple((ops.concat((k, self._zeros(b - old, k.shape[2], k)), 0),
                                 ops.concat((v, self._zeros(b - old, v.shape[2], v)), 0)) for k, v in self.caches)
            self.cache_mask = np.concatenate([self.cache_mask, np.zeros((b - old, self.cache_mask.shape[1]), np.int32)])
            self.slots += [None] * (b - old)
            return
        used = [i for i, k in enumerate(self.slots) if k is not None]
        order = used + [i for i in range(old) if i not in used][:b - len(used)]
        idx = Tensor(np.asarray(order, np.int32))
        self.caches = tuple((ops.gather(k, idx, 0), ops.gather(v, idx, 0)) for k, v in self.caches)
        self.cache_mask = self.cache_mask[order]
        self.slots = [self.slots[i] for i in order]
        for i, key in enumerate(self.slots):
            if key is not None:
                self.rows[key].index = i

    # ------------------------------------------------------------------ join / leave
    def prompt_logprobs(self, prompt_ids: Sequence[int], k: int = 0) -> list:
        """Each prompt token's log-probability given the tokens before it, and the ``k`` most likely there
        (:func:`glm_common.generation.prompt_logprobs`), from one forward pass over the prompt alone; the
        rows decoding are not touched."""
        from mindspore import Tensor
        was_training = self.model.training
        self.model.set_train(False)
        try:
            logits = self.model(Tensor(np.asarray([list(prompt_ids)], np.int32)))
        finally:
            self.model.set_train(was_training)
        return prompt_logprobs(logits.asnumpy()[0].astype(np.float32), list(prompt_ids), k)

    def add(self, key: Hashable, prompt_ids: Sequence[int], settings: Optional[SamplingSettings] = None,
            max_new_tokens: Optional[int] = None) -> int:
        """Prefill ``prompt_ids`` alone and return the first new token; the row decodes from the next
        :meth:`step` on. ``max_new_tokens`` (default: up to ``seq_length``) sizes the cache.
        Raises ``RuntimeError`` when the batch is full, ``KeyError`` for a key in use."""
        from mindspore import Tensor, ops
        if key in self.rows:
            raise KeyError(f"{key!r}: already decoding")
        if not self.free:
            raise RuntimeError(f"the batch is full ({self.max_batch} rows)")
        settings = settings or SamplingSettings()
        ids = np.asarray([list(prompt_ids)], np.int32)
        s = ids.shape[1]
        if max_new_tokens is None:
            max_new_tokens = max(self.seq_length - s, 1)
        prefill_fn, _ = self._functions()
        m, past = self._reuse(list(prompt_ids))
        was_training = self.model.training
        self.model.set_train(False)
        try:
            if m:
                if self._after_fn is None:
                    import mindspore as ms
                    model = self.model
                    fn = lambda i, p, kv: model.prefill_after(i, p, kv)          # noqa: E731
                    self._after_fn = ms.jit(fn) if getattr(model, "use_graph", True) else fn
                logits, presents = self._after_fn(Tensor(ids[:, m:]), Tensor(np.arange(m, s, dtype=np.int32)[None]),
                                                  past)
            else:
                logits, presents = prefill_fn(Tensor(ids), Tensor(np.ones_like(ids)),
                                              Tensor(np.arange(s, dtype=np.int32)[None]))
        finally:
            self.model.set_train(was_training)
        self.reused_tokens += m
        n = self.p + s
        row = _Row(0, s, settings, np.random.default_rng(settings.seed), -1, n, 0, prompt_ids)
        row.pending = self._pick(row, logits.asnumpy())
        # room: columns t-n .. t-1 for the prompt, t .. for the tokens to come
        if self.caches is None:
            self.t = n
            length = _round_up(n + max_new_tokens, self.block)
            self.caches = tuple((self._zeros(1, length, k), self._zeros(1, length, v)) for k, v in presents)
            self.cache_mask = np.zeros((1, length), np.int32)
            self.slots = [None]
        else:
            if None not in self.slots:
                self._resize_batch(min(2 * len(self.slots), self.max_batch))
            t = max(self.t, n)
            ends = [r.end - self.t + t for r in self.rows.values()] + [t + max_new_tokens]
            length = self.cache_mask.shape[1]
            if t > self.t or max(ends) > length:
                if max(ends) > length:                   # drop the columns no row needs
                    keep = max([r.length for r in self.rows.values()] + [0])
                    t = max(keep, n)
                    ends = [r.end - self.t + t for r in self.rows.values()] + [t + max_new_tokens]
                    length = max(length, _round_up(max(ends), self.block))
                    self._columns(self.t - keep, self.t, t - keep, length)
                else:
                    self._columns(0, self.t, t - self.t, length)
                for r in self.rows.values():
                    r.end += t - self.t
                self.t = t
        i = self.slots.index(None)
        length = self.cache_mask.shape[1]
        t = self.t
        select = np.zeros((len(self.slots), 1, 1, 1), bool)
        select[i] = True
        select = Tensor(select)

        def place(old, new):
            parts = [new]
            if t - n:
                parts.insert(0, self._zeros(1, t - n, new))
            if length - t:
                parts.append(self._zeros(1, length - t, new))
            return ops.select(select, ops.concat(parts, 2) if len(parts) > 1 else new, old)

        self.caches = tuple((place(k, pk), place(v, pv)) for (k, v), (pk, pv) in zip(self.caches, presents))
        self.cache_mask[i] = 0
        self.cache_mask[i, t - n:t] = 1
        row.index, row.end = i, t + max_new_tokens
        self.slots[i] = key
        self.rows[key] = row
        return row.pending

    def _reuse(self, ids: list):
        """``(m, past)``: the keys/values of the longest start ``ids`` shares with a kept entry (at most
        ``len(ids) - 1`` tokens, so one is left to run), or ``(0, None)``."""
        import mindspore as ms
        best, m = None, 0
        for kept in self.kept:
            k = common_start(kept, ids)
            if k > m:
                best, m = kept, k
        m = min(m, len(ids) - 1)
        if best is None or m < 1:
            return 0, None
        self.kept.move_to_end(best)
        return m, ms.mutable(tuple((k[:, :, :m], v[:, :, :m]) for k, v in self.kept[best]))

    def _keep(self, row: _Row) -> None:
        """Keep ``row``'s keys/values (its ids but the pending last one) for later prompts."""
        ids = tuple(row.ids[:-1])
        if row.length != len(ids) or len(ids) < 2 or self.p:
            return
        i, start = row.index, self.t - row.length
        self.kept[ids] = tuple((k[i:i + 1, :, start:self.t], v[i:i + 1, :, start:self.t]) for k, v in self.caches)
        self.kept.move_to_end(ids)
        while len(self.kept) > self.prefix_cache:
            self.kept.popitem(last=False)

    def remove(self, key: Hashable) -> None:
        """Drop a row now (finished or abandoned); unknown keys are ignored."""
        row = self.rows.pop(key, None)
        if row is None:
            return
        if self.prefix_cache:
            self._keep(row)
        self.slots[row.index] = None
        self.cache_mask[row.index] = 0
        if not self.rows:
            self.caches, self.slots, self.t = None, [], 0
            self.cache_mask = np.zeros((0, 0), np.int32)
        elif len(self.rows) <= len(self.slots) // 2:
            self._resize_batch(len(self.slots) // 2)

    # ------------------------------------------------------------------ decode
    def step(self) -> dict:
        """One decode step for every row: ``{key: next token}`` (an exception for a row whose token
        choice failed; the caller removes that row)."""
        import mindspore as ms
        from mindspore import Tensor
        if not self.rows:
            return {}
        length = self.cache_mask.shape[1]
        if self.t >= length:                              # a row outlived its max_new_tokens: make room
            keep = max(r.length for r in self.rows.values())
            self._columns(self.t - keep, self.t, 0, max(length, _round_up(keep + 1, self.block)))
            self.t = keep
            length = self.cache_mask.shape[1]
        b = len(self.slots)
        ids = np.zeros((b, 1), np.int32)
        pos = np.zeros((b, 1), np.int32)
        for key, r in self.rows.items():
            ids[r.index, 0], pos[r.index, 0] = r.pending, r.position
            self.cache_mask[r.index, self.t] = 1
        slot = np.zeros((1, 1, length, 1), bool)
        slot[0, 0, self.t, 0] = True
        _, decode_fn = self._functions()
        was_training = self.model.training
        self.model.set_train(False)
        try:
            logits, self.caches = decode_fn(Tensor(ids), Tensor(pos), Tensor(self.cache_mask.copy()), Tensor(slot),
                                            ms.mutable(self.caches))
        finally:
            self.model.set_train(was_training)
        self.t += 1
        scores = logits.asnumpy()
        out = {}
        for key, r in self.rows.items():
            r.length += 1                                # the step wrote this row's column either way
            try:
                tok = self._pick(r, scores[r.index:r.index + 1])
            except Exception as e:                       # noqa: BLE001 - this row fails, the others go on
                out[key] = e
                continue
            r.pending = tok
            r.position += 1
            out[key] = tok
        return out
