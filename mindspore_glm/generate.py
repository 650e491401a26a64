"""Generation with a preallocated, static-shape KV cache; ``chat`` and ``stream_chat`` as ChatGLM2 has them.

Two graphs per shape: the prefill (whole prompt ``[B, S]``) and one decode step (``[B, 1]`` against a
cache of ``L`` slots, ``L = P + S + max_new_tokens`` rounded up to a multiple of ``cache_block``). The
decode step writes its key/value into the cache through a boolean slot mask, so every step runs the
same graph; the cache mask grows by one 1 a step and the next position id is the last one plus 1.

Logits processing happens in numpy on the ``[B, V]`` float32 scores, in the order HF applies it:
NaN/Inf guard (all scores 0, token 5 gets 5e4), repetition penalty, temperature, top-k, top-p.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from glm_common.generation import chat_token_budget, invalid_score_processor, new_token_budget
from glm_common.prompt import build_prompt, process_response

__all__ = ["invalid_score_processor", "process_logits", "sample_next", "position_ids_from_mask", "GenerationMixin"]


def process_logits(scores: np.ndarray, ids: np.ndarray, repetition_penalty: float = 1.0,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   do_sample: bool = False) -> np.ndarray:
    """``scores [B, V]`` float32, ``ids [B, T]`` tokens so far -> processed scores (``-inf`` = removed).

    MindSpore-only: the scores are processed on the host in numpy in one call (torch_glm's twins are the
    ``apply_*`` processors)."""
    scores = invalid_score_processor(ids, np.array(scores, dtype=np.float32, copy=True))
    if repetition_penalty != 1.0:
        rows = np.arange(scores.shape[0])[:, None]
        picked = scores[rows, ids]
        scores[rows, ids] = np.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty)
    if not do_sample:
        return scores
    if temperature != 1.0:
        if temperature <= 0:
            raise ValueError(f"temperature: must be > 0 when sampling, got {temperature}")
        scores = scores / np.float32(temperature)
    if top_k and top_k > 0 and top_k < scores.shape[-1]:
        kth = np.sort(scores, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")                       # ascending
        sorted_scores = np.take_along_axis(scores, order, -1)
        probs = _softmax(sorted_scores)
        remove = np.cumsum(probs, -1) <= (1 - top_p)
        remove[:, -1] = False                                                     # keep at least one
        mask = np.zeros_like(remove)
        np.put_along_axis(mask, order, remove, -1)
        scores = np.where(mask, -np.inf, scores)
    return scores


def _softmax(x):
    x = x - np.max(x, -1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def sample_next(scores: np.ndarray, do_sample: bool, generator: Optional[np.random.Generator] = None) -> np.ndarray:
    """Processed ``scores [B, V]`` -> next tokens ``[B]`` (argmax, or one draw per row from ``generator``,
    a numpy ``Generator``; a fresh one when None)."""
    if not do_sample:
        return np.argmax(scores, -1)
    rng = generator if generator is not None else np.random.default_rng()
    probs = _softmax(scores.astype(np.float64))
    u = rng.random((probs.shape[0], 1))
    return np.minimum((np.cumsum(probs, -1) < u).sum(-1), probs.shape[-1] - 1)


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """``[B, S]`` mask -> positions: 0 for left pads, ``0..n-1`` for the tokens (the tokenizer's rule)."""
    return np.maximum(np.cumsum(attention_mask.astype(np.int64), -1) - 1, 0)


def _as_numpy(x):
    if x is None:
        return None
    if hasattr(x, "asnumpy"):
        return x.asnumpy()
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class GenerationMixin:
    """``generate``, ``stream_generate``, ``chat`` and ``stream_chat`` for the MindSpore ChatGLM2 model.

    Diverges from torch_glm's in one place: the KV cache is static (preallocated per call, prefill and
    decode graphs of fixed shapes for GRAPH mode), so a cache is never continued across calls.

    The model provides ``prefill`` and ``decode`` (see :mod:`mindspore_glm.model`); ``use_graph`` (default
    True) compiles both with ``mindspore.jit``; set it to False to run them op by op (PYNATIVE).
    """

    use_graph = True
    cache_block = 64

    def _generation_fns(self):
        cache = self.__dict__.get("_gen_fns")
        if cache is not None and cache[0] == self.use_graph:
            return cache[1], cache[2]
        model = self

        def prefill_fn(input_ids, attention_mask, position_ids):
            return model.prefill(input_ids, attention_mask, position_ids)

        def decode_fn(input_ids, position_ids, cache_mask, slot, kv_caches):
            return model.decode(input_ids, position_ids, cache_mask, slot, kv_caches)

        if self.use_graph:
            prefill_fn, decode_fn = ms.jit(prefill_fn), ms.jit(decode_fn)
        self.__dict__["_gen_fns"] = (self.use_graph, prefill_fn, decode_fn)
        return prefill_fn, decode_fn

    def stream_generate(self, input_ids, attention_mask=None, position_ids=None,
                        max_new_tokens: Optional[int] = None, max_length: Optional[int] = None,
                        do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                        repetition_penalty: float = 1.0, eos_token_id=None, pad_token_id: Optional[int] = None,
                        seed: Optional[int] = None, generator: Optional[np.random.Generator] = None,
                        logits_processor=None, past_key_values=None,
                        return_past_key_values: bool = False) -> Iterator[np.ndarray]:
        """Yield the new tokens ``[B]`` of each step (finished rows get the pad id); see :meth:`generate`.

        ``past_key_values`` / ``return_past_key_values`` (torch_glm's cache continuation) are refused:
        the static KV cache lives for one call (a ``ValueError`` names them).
        """
        if past_key_values is not None or return_past_key_values:
            raise ValueError("stream_generate: past_key_values / return_past_key_values: the MindSpore static "
                             "KV cache lives for one call and is not continued")

        ids = _as_numpy(input_ids).astype(np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        b, s = ids.shape
        mask = np.ones_like(ids) if attention_mask is None else _as_numpy(attention_mask).astype(np.int64)
        if position_ids is None:
            pos = position_ids_from_mask(mask)
        else:
            pos = _as_numpy(position_ids).astype(np.int64)
        max_new_tokens = new_token_budget(s, max_new_tokens, max_length)
        if max_new_tokens <= 0:
            return
        pad_id = self.config.pad_token_id if pad_token_id is None else pad_token_id
        if mask.shape != ids.shape or pos.shape != ids.shape:
            raise ValueError(f"generate: attention_mask {mask.shape} and position_ids {pos.shape} must match "
                             f"input_ids {ids.shape}")
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        eos = set(np.atleast_1d(np.asarray(eos_token_id, np.int64)).tolist())
        if int(pos.max()) + max_new_tokens >= self.config.seq_length:
            raise ValueError(f"generate: positions up to {int(pos.max()) + max_new_tokens} exceed the rotary "
                             f"table (config.seq_length {self.config.seq_length})")
        rng = generator if generator is not None else np.random.default_rng(seed)
        processors = list(logits_processor or [])
        p = self.pre_seq_len
        need = p + s + max_new_tokens
        cache_len = -(-need // self.cache_block) * self.cache_block
        prefill_fn, decode_fn = self._generation_fns()
        was_training = self.training
        self.set_train(False)
        try:
            logits, presents = prefill_fn(Tensor(ids.astype(np.int32)), Tensor(mask.astype(np.int32)),
                                          Tensor(pos.astype(np.int32)))
            caches = []
            for k, v in presents:
                pad = ops.zeros((b, k.shape[1], cache_len - k.shape[2], k.shape[3]), k.dtype)
                caches.append((ops.concat((k, pad), 2), ops.concat((v, pad), 2)))
            caches = tuple(caches)
            cache_mask = np.zeros((b, cache_len), np.int32)
            cache_mask[:, :p] = 1
            cache_mask[:, p:p + s] = mask
            seen = ids
            done = np.zeros(b, bool)
            last_pos = pos[:, -1].copy()
            for step in range(max_new_tokens):
                scores = logits.asnumpy()
                for proc in processors:
                    scores = proc(seen, scores)
                scores = process_logits(scores, seen, repetition_penalty, temperature, top_k, top_p, do_sample)
                nxt = sample_next(scores, do_sample, rng).astype(np.int64)
                nxt = np.where(done, pad_id, nxt)
                yield nxt
                seen = np.concatenate([seen, nxt[:, None]], 1)
                done |= np.isin(nxt, list(eos)) if eos else False
                if done.all() or step == max_new_tokens - 1:
                    return
                slot_index = p + s + step
                cache_mask[:, slot_index] = 1
                slot = np.zeros((1, 1, cache_len, 1), bool)
                slot[0, 0, slot_index, 0] = True
                last_pos = last_pos + 1
                logits, caches = decode_fn(Tensor(nxt[:, None].astype(np.int32)),
                                           Tensor(last_pos[:, None].astype(np.int32)),
                                           Tensor(cache_mask.copy()), Tensor(slot), ms.mutable(caches))
        finally:
            self.set_train(was_training)

    def generate(self, input_ids, attention_mask=None, position_ids=None, max_new_tokens: Optional[int] = None,
                 max_length: Optional[int] = None, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, eos_token_id=None,
                 pad_token_id: Optional[int] = None, seed: Optional[int] = None,
                 generator: Optional[np.random.Generator] = None, logits_processor=None) -> np.ndarray:
        """Greedy or sampled decoding with the KV cache.

        ``input_ids [B, S]`` (numpy, list or Tensor; left-padded for a batch, with ``attention_mask`` and
        ``position_ids`` as the tokenizer gives them; ``position_ids`` default: from the mask, pads 0 and
        tokens ``0..n-1``). Returns numpy int64 ``[B, S + n]``: the prompt and ``n <= max_new_tokens`` new
        tokens (``max_new_tokens``, or up to a total length ``max_length``); generation stops when every
        row has produced an id of ``eos_token_id`` (an int or a list;
        default ``config.eos_token_id``; ``[]`` never stops), and rows that finished early are filled with
        ``pad_token_id`` (default ``config.pad_token_id``). Sampling draws from ``generator`` (a numpy
        ``Generator``) or one seeded with ``seed``. ``logits_processor``: callables ``(ids [B, T],
        scores [B, V]) -> scores`` applied first, as in torch_glm.
        """
        ids = _as_numpy(input_ids).astype(np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        new = list(self.stream_generate(ids, attention_mask, position_ids, max_new_tokens, max_length, do_sample,
                                        temperature, top_p, top_k, repetition_penalty, eos_token_id,
                                        pad_token_id, seed, generator, logits_processor))
        if not new:
            return ids
        return np.concatenate([ids, np.stack(new, 1)], 1)

    # ------------------------------------------------------------------ chat
    def _chat_inputs(self, tokenizer, query, history, max_length, max_new_tokens, caller):
        """``(prompt ids [1, S], new-token budget)`` (:func:`glm_common.generation.chat_token_budget`)."""
        ids = np.asarray([tokenizer.encode(build_prompt(query, history))], np.int64)
        return ids, chat_token_budget(ids.shape[1], max_new_tokens, max_length, self.config.seq_length, caller)

    def chat(self, tokenizer, query: str, history=None, max_length: int = 8192,
             max_new_tokens: Optional[int] = None, do_sample: bool = True, top_p: float = 0.8,
             temperature: float = 0.8, top_k: int = 0, repetition_penalty: float = 1.0,
             seed: Optional[int] = None, logits_processor=None):
        """One reply: ``(response, history + [(query, response)])`` (docs/architecture.md, section 6: sampling
        with ``top_p=0.8``, ``temperature=0.8`` by default)."""
        history = list(history or [])
        ids, max_new_tokens = self._chat_inputs(tokenizer, query, history, max_length, max_new_tokens, "chat")
        out = self.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                            top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                            eos_token_id=tokenizer.eos_token_id, seed=seed,
                            logits_processor=logits_processor)[0, ids.shape[1]:].tolist()
        for stop in (tokenizer.eos_token_id, tokenizer.pad_token_id):
            if stop in out:
                out = out[:out.index(stop)]
        response = process_response(tokenizer.decode(out))
        return response, history + [(query, response)]

    def stream_chat(self, tokenizer, query: str, history=None, past_key_values=None, max_length: int = 8192,
                    max_new_tokens: Optional[int] = None, do_sample: bool = True, top_p: float = 0.8,
                    temperature: float = 0.8, top_k: int = 0, repetition_penalty: float = 1.0,
                    seed: Optional[int] = None, logits_processor=None, return_past_key_values: bool = False):
        """Yield ``(response so far, history + [(query, response so far)])`` after each new token
        (skipping states that end in an incomplete character); history is ``[(query, response), ...]``.
        ``past_key_values`` / ``return_past_key_values`` are refused (see :meth:`stream_generate`)."""
        history = list(history or [])
        ids, max_new_tokens = self._chat_inputs(tokenizer, query, history, max_length, max_new_tokens, "stream_chat")
        out = []
        for tok in self.stream_generate(ids, None, None, max_new_tokens, None, do_sample, temperature, top_p, top_k,
                                        repetition_penalty, tokenizer.eos_token_id, None, seed, None,
                                        logits_processor, past_key_values, return_past_key_values):
            if int(tok[0]) in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                break
            out.append(int(tok[0]))
            response = tokenizer.decode(out)
            if response and response[-1] != "\ufffd":
                response = process_response(response)
                yield response, history + [(query, response)]
