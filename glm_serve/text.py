"""Streaming text: the new characters to send after each token, such that the pieces joined equal
the final text exactly (for chat: ChatGLM2's ``process_response`` of the whole answer)."""
from __future__ import annotations

from glm_common.prompt import process_response

__all__ = ["TextStream"]

_MARK = "[[训练时间]]"   # the placeholder process_response replaces


class TextStream:
    """Feed the whole decoded answer after every token; :meth:`delta` returns what is new and safe to send.

    Held back until more text arrives: an incomplete character (``\\ufffd`` at the end), trailing
    whitespace and (``chat=True``) leading whitespace (``process_response`` strips both), a stop string's
    beginning, and a partial ``[[训练时间]]``. ``stop``: strings that end the answer (not included).
    """

    def __init__(self, chat: bool = True, stop=()):
        self.chat = chat
        self.stop = [s for s in (stop or ()) if s]
        self.sent = ""
        self.stopped = False

    def _final(self, raw: str) -> str:
        return process_response(raw) if self.chat else raw

    def _stop_cut(self, text: str):
        """``(text up to the first stop string, found)``."""
        cut = [text.find(s) for s in self.stop if s in text]
        if cut:
            return text[:min(cut)], True
        return text, False

    def delta(self, raw: str, final: bool = False) -> str:
        """``raw``: the decoded answer so far; ``final``: no more tokens follow. Sets ``stopped`` when a
        stop string appeared (the caller then ends the answer)."""
        if self.stopped:
            return ""
        text, found = self._stop_cut(raw)
        if found:
            self.stopped = final = True
        if final:
            safe = self._final(text)
        else:
            safe = text.rstrip("\ufffd")
            if self.chat:
                safe = safe.lstrip()
            safe = safe.rstrip()
            for s in self.stop + ([_MARK] if self.chat else []):
                for k in range(min(len(s) - 1, len(safe)), 0, -1):
                    if safe.endswith(s[:k]):
                        safe = safe[:-k]
                        break
            if self.chat:
                safe = safe.replace(_MARK, "2023年")
        if not safe.startswith(self.sent):      # decoding changed earlier text: send nothing until it settles
            return ""
        out, self.sent = safe[len(self.sent):], safe
        return out
