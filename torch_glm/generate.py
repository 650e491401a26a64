"""Generation with the KV cache, logits processing, and ChatGLM2's ``chat`` / ``stream_chat``.

:class:`GenerationMixin` gives the model ``generate`` (prompt + new ids, as transformers returns
them), ``stream_generate`` (yields the ids after every step), ``chat`` and ``stream_chat``
(docs/architecture.md, sections 6-7: prompt format, ``top_p=0.8``, ``temperature=0.8``, ``do_sample=True``, the NaN/Inf
logits processor, response post-processing, history ``[(query, response), ...]``).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch

from glm_common.generation import chat_token_budget, invalid_score_processor, new_token_budget
from glm_common.prompt import build_prompt, process_response, round_text

__all__ = ["invalid_score_processor", "apply_repetition_penalty", "apply_temperature", "apply_top_k", "apply_top_p",
           "sample_next", "position_ids_from_mask", "GenerationMixin"]

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------- processors
def apply_repetition_penalty(input_ids: torch.Tensor, scores: torch.Tensor, penalty: float) -> torch.Tensor:
    """Seen tokens' scores divided by ``penalty`` (multiplied when negative), as transformers does."""
    if penalty == 1.0:
        return scores
    seen = torch.gather(scores, 1, input_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, input_ids, seen)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature: must be positive, got {temperature}")
    return scores if temperature == 1.0 else scores / temperature


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest scores of each row (0 keeps all)."""
    if not top_k or top_k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose total probability is ``<= 1 - top_p``
    (transformers' TopPLogitsWarper; the most likely token always stays)."""
    if top_p >= 1.0:
        return scores
    if not 0.0 < top_p:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def sample_next(scores: torch.Tensor, do_sample: bool, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``scores [B, V]`` -> next ids ``[B]``: argmax, or a draw from ``softmax(float32(scores))``."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` mask -> positions: 0 for left pads, ``0..n-1`` for the tokens (the tokenizer's rule)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------- mixin
class GenerationMixin:
    """Generation for :class:`torch_glm.model.ChatGLM2ForConditionalGeneration`."""

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, past_key_values=None,
                                      attention_mask: Optional[torch.Tensor] = None,
                                      position_ids: Optional[torch.Tensor] = None, **unused) -> dict:
        """Forward kwargs of one decoding step (transformers/peft interface): with a cache, only the last
        token and its position (``[B, 1]``); positions default to the mask's (pads 0, tokens 0..n-1)."""
        if position_ids is None:
            position_ids = (position_ids_from_mask(attention_mask) if attention_mask is not None
                            else torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids))
        if past_key_values is not None:
            input_ids, position_ids = input_ids[:, -1:], position_ids[:, -1:]
        return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=past_key_values, use_cache=True, return_last_logit=True)

    @torch.no_grad()
    def stream_generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                        position_ids: Optional[torch.Tensor] = None, max_new_tokens: Optional[int] = None,
                        max_length: Optional[int] = None, do_sample: bool = False, temperature: float = 1.0,
                        top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                        eos_token_id=None, pad_token_id: Optional[int] = None, seed: Optional[int] = None,
                        generator: Optional[torch.Generator] = None,
                        logits_processor: Optional[Sequence[LogitsProcessor]] = None,
                        past_key_values=None, return_past_key_values: bool = False) -> Iterator[torch.Tensor]:
        """Yield ``[B, S + t]`` (prompt + the ``t`` tokens so far) after every new token.

        ``input_ids [B, S]`` left-padded, ``attention_mask [B, S]`` (1 token / 0 pad; default all 1),
        ``position_ids [B, S]`` (default from the mask: pads 0, tokens 0..n-1). Stops after
        ``max_new_tokens`` (or at total length ``max_length``) or when every row has produced an eos;
        finished rows continue with ``pad_token_id``. Order of processing: ``logits_processor``,
        repetition penalty, temperature, top-k, top-p (the last three only when sampling).
        ``past_key_values``: a cache the prompt continues (its mask columns are prepended as ones when
        ``attention_mask`` covers only the new ids; positions continue after it). With
        ``return_past_key_values`` each item is ``(ids, cache)``; the cache holds every token but the
        newest one. Sampling draws from ``generator``, else from one seeded with ``seed``, else from the
        global RNG.
        """
        cfg = self.config
        device = self.device
        input_ids = torch.as_tensor(input_ids, device=device).long()
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        B, S = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask, device=device).long()
        own_past = 0
        if past_key_values is not None:
            own_past = past_key_values[0][0].shape[2] - (getattr(cfg, "pre_seq_len", None) or 0)
            if attention_mask.shape[1] == S:
                attention_mask = torch.cat([attention_mask.new_ones(B, own_past), attention_mask], dim=1)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)[:, -S:]
        position_ids = torch.as_tensor(position_ids, device=device).long()
        max_new_tokens = new_token_budget(S, max_new_tokens, max_length)
        if max_new_tokens <= 0:
            return
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
        eos_ids = torch.tensor(list(eos) if isinstance(eos, (list, tuple, set)) else [eos], device=device)
        pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
        processors = list(logits_processor or [])
        unfinished = torch.ones(B, dtype=torch.bool, device=device)
        ids = input_ids
        step_ids, step_pos = input_ids, position_ids
        for _ in range(max_new_tokens):
            out = self(input_ids=step_ids, attention_mask=attention_mask, position_ids=step_pos,
                       past_key_values=past_key_values, use_cache=True, return_last_logit=True)
            past_key_values = out.past_key_values
            scores = out.logits[:, -1].float()
            for proc in processors:
                scores = proc(ids, scores)
            scores = apply_repetition_penalty(ids, scores, repetition_penalty)
            if do_sample:
                scores = apply_top_p(apply_top_k(apply_temperature(scores, temperature), top_k), top_p)
            nxt = sample_next(scores, do_sample, generator)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            yield (ids, past_key_values) if return_past_key_values else ids
            unfinished = unfinished & ~torch.isin(nxt, eos_ids)
            if not bool(unfinished.any()):
                return
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            step_pos = position_ids[:, -1:] + 1 if step_pos is position_ids else step_pos + 1
            step_ids = nxt[:, None]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 position_ids: Optional[torch.Tensor] = None, max_new_tokens: Optional[int] = None,
                 max_length: Optional[int] = None, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, eos_token_id=None,
                 pad_token_id: Optional[int] = None, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None,
                 logits_processor: Optional[Sequence[LogitsProcessor]] = None, **unused) -> torch.Tensor:
        """Prompt + new ids ``[B, S + T]`` (``T <= max_new_tokens``), as transformers' ``generate``.

        Greedy unless ``do_sample``; sampling draws from ``generator`` (seeded ``torch.Generator``) or
        the global RNG. See :meth:`stream_generate` for the arguments.
        """
        ids = torch.as_tensor(input_ids, device=self.device).long()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        for ids in self.stream_generate(ids, attention_mask, position_ids, max_new_tokens, max_length,
                                        do_sample, temperature, top_p, top_k, repetition_penalty,
                                        eos_token_id, pad_token_id, seed, generator, logits_processor):
            pass
        return ids

    # ------------------------------------------------------------------ chat
    def _chat_inputs(self, tokenizer, query: str, history):
        enc = tokenizer([build_prompt(query, history)], padding=True, return_tensors="np")
        return {k: torch.as_tensor(v, device=self.device) for k, v in enc.items()}

    def _chat_kwargs(self, prompt_len, max_length, max_new_tokens, do_sample, top_p, temperature, top_k,
                     repetition_penalty, seed, logits_processor, kwargs, caller):
        """``generate`` arguments of a chat turn: the budget of
        :func:`glm_common.generation.chat_token_budget`, the invalid-score guard first."""
        procs = [invalid_score_processor] + list(logits_processor or [])
        budget = chat_token_budget(prompt_len, max_new_tokens, max_length, self.config.seq_length, caller)
        gen = dict(max_new_tokens=budget, do_sample=do_sample, top_p=top_p, temperature=temperature, top_k=top_k,
                   repetition_penalty=repetition_penalty, seed=seed, logits_processor=procs)
        gen.update(kwargs)
        return gen

    @staticmethod
    def _decode_new(tokenizer, new_ids: list[int]) -> str:
        stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        while new_ids and new_ids[-1] in stop:
            new_ids = new_ids[:-1]
        return tokenizer.decode(new_ids)

    @torch.no_grad()
    def chat(self, tokenizer, query: str, history: Optional[list] = None, max_length: int = 8192,
             max_new_tokens: Optional[int] = None, do_sample: bool = True, top_p: float = 0.8,
             temperature: float = 0.8, top_k: int = 0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
             logits_processor: Optional[Sequence[LogitsProcessor]] = None, **kwargs) -> tuple[str, list]:
        """Answer ``query`` after ``history`` ``[(query, response), ...]``; returns ``(response, history + [(query, response)])``.

        ``max_length`` bounds prompt + answer (ChatGLM2's default 8192); ``max_new_tokens`` overrides it.
        Extra ``kwargs`` (``generator``, ``eos_token_id``) go to :meth:`generate`.
        """
        history = list(history or [])
        inputs = self._chat_inputs(tokenizer, query, history)
        out = self.generate(**inputs, **self._chat_kwargs(inputs["input_ids"].shape[1], max_length, max_new_tokens,
                                                            do_sample, top_p, temperature, top_k, repetition_penalty,
                                                            seed, logits_processor, kwargs, "chat"))
        response = process_response(self._decode_new(tokenizer, out[0, inputs["input_ids"].shape[1]:].tolist()))
        return response, history + [(query, response)]

    @torch.no_grad()
    def stream_chat(self, tokenizer, query: str, history: Optional[list] = None, past_key_values=None,
                    max_length: int = 8192, max_new_tokens: Optional[int] = None, do_sample: bool = True,
                    top_p: float = 0.8, temperature: float = 0.8, top_k: int = 0, repetition_penalty: float = 1.0,
                    seed: Optional[int] = None, logits_processor: Optional[Sequence[LogitsProcessor]] = None,
                    return_past_key_values: bool = False, **kwargs) -> Iterator[tuple]:
        """Yield ``(response so far, history + [(query, response so far)])`` as tokens arrive; a partial
        UTF-8 character (response ending in U+FFFD) is held back until it completes.

        With ``past_key_values`` (the cache a previous call returned with ``return_past_key_values``)
        only the new round ``"\n\n[Round n]\n\n问：...\n\n答："`` is encoded and the cache is
        continued, as ChatGLM2's ``stream_chat``; with ``return_past_key_values`` items are
        ``(response, history, cache)``.
        """
        history = list(history or [])
        if past_key_values is None and not return_past_key_values:
            inputs = self._chat_inputs(tokenizer, query, history)
        else:
            inputs = self._stream_inputs(tokenizer, query, history)
        S = inputs["input_ids"].shape[1]
        cached = 0 if past_key_values is None else past_key_values[0][0].shape[2] - (self.config.pre_seq_len or 0)
        gen = self._chat_kwargs(cached + S, max_length, max_new_tokens, do_sample, top_p, temperature, top_k,
                                repetition_penalty, seed, logits_processor, kwargs, "stream_chat")
        for item in self.stream_generate(**inputs, **gen, past_key_values=past_key_values, return_past_key_values=True):
            ids, cache = item
            text = self._decode_new(tokenizer, ids[0, S:].tolist())
            if text and text[-1] != "\ufffd":
                response = process_response(text)
                new_history = history + [(query, response)]
                yield (response, new_history, cache) if return_past_key_values else (response, new_history)

    def _stream_inputs(self, tokenizer, query: str, history) -> dict:
        """The new round alone: ``[gMASK] sop`` + round text for the first round, else the round text
        after ``"\n\n"`` without special tokens (SentencePiece's leading ``"▁"`` piece dropped)."""
        if not history:
            return self._chat_inputs(tokenizer, query, history)
        text = "\n\n" + round_text(len(history) + 1, query)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids and tokenizer.convert_id_to_token(ids[0]) == "\u2581":
            ids = ids[1:]
        ids_t = torch.tensor([ids], device=self.device)
        return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}
