"""Generation rules both backends apply: ChatGLM2's invalid-score guard and the new-token budget.

Backend-free (numpy or any tensor with ``isfinite``/``new_zeros``); ``mindspore_glm.generate`` and
``torch_glm.generate`` re-export :func:`invalid_score_processor` and call the budget functions.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from glm_common.prompt import INVALID_SCORE_TOKEN, INVALID_SCORE_VALUE

__all__ = ["INVALID_SCORE_TOKEN", "INVALID_SCORE_VALUE", "invalid_score_processor", "new_token_budget",
           "chat_token_budget"]


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
