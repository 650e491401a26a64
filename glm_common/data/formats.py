"""Reading fine-tuning data files into :class:`Sample` objects, one format at a time.

Every supported format becomes the same thing: a list of ChatGLM2 rounds ``(query, response, loss)``
plus, for plain text, a single ``text``. Features (``glm_common.data.features``) are built from that.

Formats (``FORMATS``; auto-detected from the keys of the first row, or named explicitly):

=================  =====================================================  ==============================
name               keys of a row                                          becomes
=================  =====================================================  ==============================
``adgen``          ``content``, ``summary``                               one round, loss on ``summary``
``instruction``    ``instruction`` [, ``input``] , ``output`` [, history]  one round, query is instruction
                                                                          and input joined by ``"\\n"``
``chat``           ``prompt``, ``response`` [, ``history``]               past rounds + one round, loss on
                                                                          ``response`` only ("in-the-loop")
``session``        ``prompt: [..]``, ``response: [..]``                   all rounds, loss on every response
``messages``       ``messages`` [, ``tools``]  (GLM-4 fine-tuning)        rounds, loss on assistant turns
``context_target`` ``context``, ``target`` (ChatGLM2-LoRA-Trainer)        one round, loss on ``target``
``text``           a ``.txt`` line, or ``{"text": ..}``                    plain text, loss on every token
=================  =====================================================  ==============================

``history`` is ``[[query, response], ...]`` as in the ChatGLM2 ptuning data.

GLM-4 ``messages`` -> ChatGLM2 rounds
-------------------------------------
ChatGLM2 knows only rounds ``[Round i]\\n\\n问：{query}\\n\\n答：{response}``. A ``messages`` list is mapped so:

* ``system`` messages (allowed only before the first ``user`` message) and the ``tools`` definitions
  form a preamble: the system texts, then ``"可用工具：" + json.dumps(tools, ensure_ascii=False)``,
  joined by ``"\\n\\n"``. The preamble is put in front of the query of the FIRST KEPT round, followed by
  ``"\\n\\n"`` (if old rounds are dropped by ``rounds`` truncation, it moves to the new first round).
  The preamble is never trained on.
* ``user`` opens a new round whose query is its content (consecutive ``user`` messages are joined by
  ``"\\n"`` into one query).
* ``assistant`` is the response of the open round (consecutive ``assistant`` messages are joined by
  ``"\\n"``). An assistant ``tool_calls`` list is appended to its content as
  ``json.dumps(tool_calls, ensure_ascii=False)`` on its own line. ``"loss": false`` on an assistant
  message excludes its round from the loss.
* ``observation`` (a tool result) opens a new round whose query is the observation content: the
  model reads the result where it would read a user turn and the next ``assistant`` message answers it.
* Loss is on assistant text only (plus the end-of-text token after the last one); system, tools, user
  and observation text are context. A conversation must end with an assistant message.

Files: JSON Lines (one object a line; ADGEN's ``.json`` files are this) or one JSON array of objects,
UTF-8 with or without a BOM. Bad rows are reported as ``FILE:LINE: what is wrong``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
from typing import Callable, Optional

__all__ = ["Round", "Sample", "BadRow", "DataError", "FORMATS", "detect_format", "read_samples",
           "load_samples", "iter_rows"]

FORMATS = ("adgen", "instruction", "chat", "session", "messages", "context_target", "text")
ROLES = ("system", "user", "assistant", "observation")
TOOLS_HEADER = "可用工具："


class DataError(ValueError):
    """A data file that cannot be used; the message starts with ``FILE:LINE:``."""


@dataclasses.dataclass(frozen=True)
class BadRow:
    """One problem in a data file: ``str(bad)`` is ``FILE:LINE: message``."""
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Round:
    """One ChatGLM2 round: the user's ``query``, the model's ``response``, trained on when ``loss``."""
    query: str
    response: str
    loss: bool = True


@dataclasses.dataclass
class Sample:
    """One training example.

    ``rounds``: ChatGLM2 rounds in order (empty for plain text). ``text``: plain text, loss on all of
    it (``rounds`` is then empty). ``preamble``: system/tool text put before the first kept query.
    ``where``: ``FILE:LINE`` of the row.
    """
    rounds: list = dataclasses.field(default_factory=list)
    text: Optional[str] = None
    preamble: str = ""
    where: str = ""

    @property
    def is_text(self) -> bool:
        return self.text is not None

    @property
    def single_target(self) -> bool:
        """True when only the last round is trained on (the official ChatGLM2 case)."""
        return not self.is_text and self.rounds[-1].loss and not any(r.loss for r in self.rounds[:-1])

    def history(self, start: int = 0) -> list:
        """``[(query, response), ...]`` of rounds ``start..-2`` with the preamble in the first query."""
        return [(self._query(i, start), r.response) for i, r in enumerate(self.rounds[start:-1], start)]

    def query(self, start: int = 0) -> str:
        """The last round's query (with the preamble when it is the first kept round)."""
        return self._query(len(self.rounds) - 1, start)

    def _query(self, i: int, start: int) -> str:
        q = self.rounds[i].query
        if i == start and self.preamble:
            return self.preamble + "\n\n" + q
        return q

    @property
    def answer(self) -> str:
        """The reference answer: the last round's response."""
        return self.rounds[-1].response


class _Bad(Exception):
    """A bad row inside a parser; carries only the message."""


# ---------------------------------------------------------------------------------- field checks
def _str(row: dict, key: str, *, required: bool = True, nonempty: bool = False) -> str:
    if key not in row or row[key] is None:
        if required:
            raise _Bad(f"missing field {key!r}")
        return ""
    v = row[key]
    if not isinstance(v, str):
        raise _Bad(f"field {key!r} must be a string, got {type(v).__name__}")
    if nonempty and not v.strip():
        raise _Bad(f"field {key!r} is empty")
    return v


def _history(row: dict, key: str = "history") -> list:
    h = row.get(key)
    if h is None:
        return []
    if not isinstance(h, list):
        raise _Bad(f"field {key!r} must be a list of [query, response] pairs, got {type(h).__name__}")
    out = []
    for i, pair in enumerate(h):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, str) for x in pair)):
            raise _Bad(f"{key}[{i}] must be a [query, response] pair of strings")
        out.append(Round(pair[0], pair[1], loss=False))
    return out


def _parse_adgen(row: dict) -> Sample:
    return Sample([Round(_str(row, "content", nonempty=True), _str(row, "summary", nonempty=True))])


def _parse_instruction(row: dict) -> Sample:
    instruction = _str(row, "instruction", nonempty=True)
    inp = _str(row, "input", required=False)
    query = instruction + "\n" + inp if inp.strip() else instruction
    return Sample(_history(row) + [Round(query, _str(row, "output", nonempty=True))])


def _parse_chat(row: dict) -> Sample:
    if isinstance(row.get("prompt"), list):
        raise _Bad("field 'prompt' is a list: this is the 'session' format, not 'chat'")
    return Sample(_history(row) + [Round(_str(row, "prompt", nonempty=True),
                                         _str(row, "response", nonempty=True))])


def _parse_session(row: dict) -> Sample:
    for key in ("prompt", "response"):
        if key not in row:
            raise _Bad(f"missing field {key!r}")
        if not isinstance(row[key], list):
            raise _Bad(f"field {key!r} must be a list of strings (one per round), got {type(row[key]).__name__}")
    prompts, responses = row["prompt"], row["response"]
    if not prompts:
        raise _Bad("field 'prompt' is an empty list")
    if len(prompts) != len(responses):
        raise _Bad(f"'prompt' has {len(prompts)} rounds but 'response' has {len(responses)}")
    rounds = []
    for i, (q, a) in enumerate(zip(prompts, responses)):
        if not isinstance(q, str) or not isinstance(a, str):
            raise _Bad(f"round {i}: prompt and response must be strings")
        if not q.strip():
            raise _Bad(f"prompt[{i}] is empty")
        if not a.strip():
            raise _Bad(f"response[{i}] is empty")
        rounds.append(Round(q, a, loss=True))
    return Sample(rounds)


def _parse_messages(row: dict) -> Sample:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _Bad("field 'messages' must be a non-empty list of {role, content} objects")
    preamble = []
    tools = row.get("tools")
    rounds: list = []           # [query, response or None, loss]
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _Bad(f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise _Bad(f"messages[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _Bad(f"messages[{i}]: content must be a string, got {type(content).__name__}")
        if role == "system":
            if rounds:
                raise _Bad(f"messages[{i}]: a system message after the conversation started")
            if "tools" in m and tools is None:
                tools = m["tools"]
            if content.strip():
                preamble.append(content)
        elif role in ("user", "observation"):
            if not content.strip():
                raise _Bad(f"messages[{i}]: {role} content is empty")
            if rounds and rounds[-1][1] is None:
                prev_role = rounds[-1][3]
                if prev_role != role:
                    raise _Bad(f"messages[{i}]: {role} after {prev_role} without an assistant answer")
                rounds[-1][0] += "\n" + content
            else:
                rounds.append([content, None, True, role])
        else:  # assistant
            calls = m.get("tool_calls")
            if calls:
                content = (content + "\n" if content else "") + json.dumps(calls, ensure_ascii=False)
            if not content.strip():
                raise _Bad(f"messages[{i}]: assistant content is empty")
            loss = m.get("loss", True)
            if not isinstance(loss, bool):
                raise _Bad(f"messages[{i}]: 'loss' must be true or false, got {loss!r}")
            if not rounds:
                raise _Bad(f"messages[{i}]: assistant message before any user message")
            if rounds[-1][1] is None:
                rounds[-1][1], rounds[-1][2] = content, loss
            else:
                rounds[-1][1] += "\n" + content
                rounds[-1][2] = rounds[-1][2] or loss
    if not rounds:
        raise _Bad("no user message")
    if rounds[-1][1] is None:
        raise _Bad("the conversation ends without an assistant answer")
    if not any(r[2] for r in rounds):
        raise _Bad("no assistant message is trained on (all have \"loss\": false)")
    if tools is not None:
        if not isinstance(tools, (list, dict)):
            raise _Bad(f"field 'tools' must be a list of tool definitions, got {type(tools).__name__}")
        if tools:
            preamble.append(TOOLS_HEADER + json.dumps(tools, ensure_ascii=False))
    return Sample([Round(q, a, loss) for q, a, loss, _ in rounds], preamble="\n\n".join(preamble))


def _parse_context_target(row: dict) -> Sample:
    return Sample([Round(_str(row, "context", nonempty=True), _str(row, "target", nonempty=True))])


def _parse_text(row) -> Sample:
    if isinstance(row, str):
        text = row
    else:
        text = _str(row, "text")
    if not text.strip():
        raise _Bad("text is empty")
    return Sample(text=text)


_PARSERS: dict[str, Callable] = {
    "adgen": _parse_adgen, "instruction": _parse_instruction, "chat": _parse_chat,
    "session": _parse_session, "messages": _parse_messages, "context_target": _parse_context_target,
    "text": _parse_text,
}


def detect_format(row) -> Optional[str]:
    """The format name for a parsed row (a dict, or a str for ``.txt`` lines), or None when unknown."""
    if isinstance(row, str):
        return "text"
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if {"content", "summary"} <= keys:
        return "adgen"
    if {"instruction", "output"} <= keys:
        return "instruction"
    if {"prompt", "response"} <= keys:
        return "session" if isinstance(row["prompt"], list) else "chat"
    if {"context", "target"} <= keys:
        return "context_target"
    if "text" in keys:
        return "text"
    return None


# ---------------------------------------------------------------------------------- file reading
def _decode(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a directory, expected a data file")
    if not stat.S_ISREG(mode):  # a FIFO, /dev/zero ...: reading it would block or never end
        raise DataError(f"{path}: not a regular file (a pipe or device), expected a data file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def iter_rows(path: str | os.PathLike, bad: Optional[list] = None):
    """Yield ``(line, row)`` for each row of a file: parsed JSON objects, or strings for ``.txt``.

    Invalid JSON is appended to ``bad`` as :class:`BadRow` (or raised as :class:`DataError` when
    ``bad`` is None). A JSON array that does not parse stops the file at the error.
    """
    path = os.fspath(path)
    text = _decode(path)

    def report(line, msg):
        if bad is None:
            raise DataError(str(BadRow(path, line, msg)))
        bad.append(BadRow(path, line, msg))

    if path.endswith(".txt"):
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield i, line
        return
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _iter_array(path, text, report)
        return
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            report(i, f"invalid JSON: {e.msg} (column {e.colno})")
            continue
        yield i, row


def _iter_array(path, text, report):
    dec = json.JSONDecoder()
    n = len(text)
    pos = text.index("[") + 1
    line, counted = 1, 0

    def skip_ws(p):
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            row, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            report(e.lineno, f"invalid JSON: {e.msg} (column {e.colno})")
            return
        yield line, row
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            if skip_ws(pos + 1) < n:
                report(text.count("\n", 0, pos) + 1, "invalid JSON: extra data after the array")
            return
        report(text.count("\n", 0, pos) + 1, "invalid JSON: expected ',' or ']' in the array")
        return


def read_samples(path: str | os.PathLike, format: Optional[str] = None) -> tuple[list, list, str]:
    """Parse a whole file; return ``(samples, bad_rows, format)``; never raises for bad rows.

    ``format``: one of ``FORMATS`` or None to detect it from the keys of the first row.
    """
    path = os.fspath(path)
    if format is not None and format not in _PARSERS:
        raise DataError(f"format: unknown {format!r} (expected one of {', '.join(FORMATS)})")
    bad: list = []
    samples: list = []
    parse = _PARSERS.get(format) if format else None
    for line, row in iter_rows(path, bad):
        if parse is None:
            format = detect_format(row)
            if format is None:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}:{line}: cannot tell the data format from the keys {keys}; "
                                f"name it (one of {', '.join(FORMATS)})")
            parse = _PARSERS[format]
        if format != "text" and not isinstance(row, dict):
            bad.append(BadRow(path, line, f"expected a JSON object, got {type(row).__name__}"))
            continue
        try:
            s = parse(row)
        except _Bad as e:
            msg, other = str(e), detect_format(row)
            if other not in (None, format):
                msg += f" (the row looks like format {other!r}, the file is {format!r})"
            bad.append(BadRow(path, line, msg))
            continue
        s.where = f"{path}:{line}"
        samples.append(s)
    if not samples and not bad:
        raise DataError(f"{path}:1: no rows (empty file)")
    return samples, bad, format or "unknown"


def load_samples(paths, format: Optional[str] = None, on_error: str = "raise", skip_hint: Optional[str] = None) -> list:
    """Load one file or a list of files into :class:`Sample` objects.

    ``on_error="raise"`` (default) raises :class:`DataError` naming the first bad row (``FILE:LINE:
    what is wrong``) and how many there are; ``"skip"`` drops bad rows and prints
    ``FILE: skipped N bad rows`` to stderr. ``skip_hint``: how the caller's user skips bad rows (a flag of
    that command), added to the error; without it the error names no flag (the runners have none).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list = []
    for path in paths:
        samples, bad, _ = read_samples(path, format)
        if bad:
            if on_error == "raise":
                more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
                skip = f", or {skip_hint}" if skip_hint else ""
                raise DataError(f"{bad[0]}{more}; list them with `python -m glm_common.data check "
                                f"{os.fspath(path)}` and fix or remove them{skip}")
            print(f"{os.fspath(path)}: skipped {len(bad)} bad rows (first: {bad[0]})", file=sys.stderr)
        out.extend(samples)
    return out
