"""The ChatGLM2 chat format, written once: prompt building and response post-processing."""
from __future__ import annotations

from typing import Iterable, Optional

__all__ = ["build_prompt", "round_text", "process_response", "ROUND_FORMAT", "QUERY_FORMAT",
           "INVALID_SCORE_TOKEN", "INVALID_SCORE_VALUE"]

#: one finished round of history; ``i`` counts from 1.
ROUND_FORMAT = "[Round {i}]\n\n问：{query}\n\n答：{response}\n\n"
#: the open round the model answers.
QUERY_FORMAT = "[Round {i}]\n\n问：{query}\n\n答："
#: ChatGLM2's invalid-score guard: when a score is NaN/Inf, all scores become 0 and this token gets this value.
INVALID_SCORE_TOKEN = 5
INVALID_SCORE_VALUE = 5e4


def round_text(i: int, query: str, response: Optional[str] = None) -> str:
    """Round ``i`` (from 1): finished when ``response`` is given, else open for the answer."""
    if response is None:
        return QUERY_FORMAT.format(i=i, query=query)
    return ROUND_FORMAT.format(i=i, query=query, response=response)


def build_prompt(query: str, history: Optional[Iterable] = None) -> str:
    """``history`` is ``[(query, response), ...]``; the prompt ends with ``答：`` for the model."""
    history = list(history or [])
    parts = [round_text(i + 1, q, r) for i, (q, r) in enumerate(history)]
    parts.append(round_text(len(history) + 1, query))
    return "".join(parts)


def process_response(response: str) -> str:
    """What ChatGLM2's ``chat()`` returns: stripped, with ``[[训练时间]]`` replaced by ``2023年``."""
    return response.strip().replace("[[训练时间]]", "2023年")
