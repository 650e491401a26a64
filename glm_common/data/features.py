"""Token features from :class:`~glm_common.data.formats.Sample` objects.

Train features (:func:`build_train_features`) are right-padded to the static length
``L = max_source_length + max_target_length + 1``:

* ``input_ids`` int64 ``[N, L]``: tokens, then pad (0).
* ``labels`` int64 ``[N, L]``: -100 where no loss is taken (prompt, pads), else the token id.
  The model shifts them itself (``logits[:, :-1]`` predicts ``labels[:, 1:]``).
* ``lengths`` int64 ``[N]``: real tokens per row (the batcher's dynamic padding cuts to these).

Modes:

``official``
    The ChatGLM2 ptuning ``preprocess_function_train`` (also mindformers' ADGEN loader) exactly, for
    rows trained on their last response only (every format but ``session``/``messages``/``text``)::

        a = encode(build_prompt(query, history))[:max_source_length]     # keeps [gMASK] sop, may lose "答："
        b = encode(answer, add_special_tokens=False)[:max_target_length]
        input_ids = a + b + [eos];  labels = [pad] * len(a) + b + [eos]; pads in labels -> -100

``rounds``
    As ``official``, but a prompt longer than ``max_source_length`` first loses whole old rounds
    (oldest first, the rest renumbered from ``[Round 1]``); if the last round alone is still too long,
    its head is kept together with the closing ``"\\n\\n答："`` tokens so the model still sees where
    the answer starts. Rows that fit are identical to ``official``.

Rows trained on several responses (``session``, ``messages``) are the rounds concatenated, each
context and each response encoded on its own (as the official code encodes prompt and answer)::

    [gMASK] sop  ctx_1 a_1  ctx_2 a_2 ... ctx_n a_n  eos
    ctx_1 = "[Round 1]\\n\\n问：q_1\\n\\n答："   ctx_i = "\\n\\n[Round i]\\n\\n问：q_i\\n\\n答："  (i > 1)

with labels on every trained ``a_i`` and on the final eos (when the last round is trained). A
one-round conversation gives exactly the ``official`` features. ``official`` cuts a too-long
conversation at ``L`` tokens (head kept); ``rounds`` drops whole old rounds until it fits, and a
single remaining round is cut as a prompt/answer pair. Plain text is ``[gMASK] sop text eos`` with
labels on the text and eos, cut at ``L``.

Eval features (:func:`build_eval_features`) are the prompt only, left-padded as the ChatGLM2
tokenizer pads (``input_ids``, ``attention_mask``, ``position_ids``, int64 ``[N, P]``), plus the
reference ``answers`` (a list of N strings) for generation-based metrics.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from glm_common.fsutil import OutputError, atomic_file
from glm_common.prompt import build_prompt, round_text

__all__ = ["MODES", "IGNORE_INDEX", "build_train_features", "build_eval_features", "length_stats",
           "save_features", "load_features"]

MODES = ("official", "rounds")
IGNORE_INDEX = -100
_CHUNK = 8192
_ANSWER_CUE = "\n\n答："


def _check(mode, max_source_length, max_target_length):
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    for name, v in (("max_source_length", max_source_length), ("max_target_length", max_target_length)):
        if not isinstance(v, (int, np.integer)) or v < 3:
            raise ValueError(f"{name}: expected an integer >= 3, got {v!r}")


def _tail_len(tokenizer, ids: list, max_t: int = 16) -> int:
    """How many trailing ids of a prompt spell the answer cue ``"\\n\\n答："``; 0 if not found."""
    for t in range(1, min(max_t, len(ids)) + 1):
        if _ANSWER_CUE in tokenizer.decode(ids[-t:]):
            return t
    return 0


def _fit_prompt(tokenizer, ids: list, limit: int) -> list:
    """Cut ``ids`` to ``limit`` keeping its head and the closing answer cue."""
    if len(ids) <= limit:
        return ids
    t = _tail_len(tokenizer, ids)
    if t and limit - t >= 3:
        return ids[:limit - t] + ids[-t:]
    return ids[:limit]


def _prompts(samples, starts) -> list:
    """``build_prompt(query, history)`` of each sample's last round, from round ``start`` on."""
    out = []
    for s, st in zip(samples, starts):
        if len(s.rounds) == 1 and not s.preamble:       # the common case, without the history lists
            out.append(round_text(1, s.rounds[0].query))
        else:
            out.append(build_prompt(s.query(st), s.history(st)))
    return out


def _encode_prompts(samples, tokenizer, mode, max_source_length) -> list:
    """Encoded prompts (with ``[gMASK] sop``) of the last rounds, truncated by ``mode``."""
    starts = [0] * len(samples)
    ids = tokenizer.encode_batch(_prompts(samples, starts), add_special_tokens=True)
    if mode == "official":
        return [a[:max_source_length] for a in ids]
    while True:     # rounds: drop the oldest round of every too-long prompt that still has history
        todo = [i for i, a in enumerate(ids)
                if len(a) > max_source_length and starts[i] < len(samples[i].rounds) - 1]
        if not todo:
            break
        for i in todo:
            starts[i] += 1
        new = tokenizer.encode_batch(_prompts([samples[i] for i in todo], [starts[i] for i in todo]))
        for i, a in zip(todo, new):
            ids[i] = a
    return [_fit_prompt(tokenizer, a, max_source_length) for a in ids]


def _conversation_segments(s, start: int) -> list:
    """``[(context_text, response, loss), ...]`` of rounds ``start..`` of a multi-target sample."""
    out = []
    for j, i in enumerate(range(start, len(s.rounds))):
        ctx = round_text(j + 1, s._query(i, start))
        out.append((ctx if j == 0 else "\n\n" + ctx, s.rounds[i].response, s.rounds[i].loss))
    return out


def _encode_conversations(samples, tokenizer, mode, max_source_length, max_target_length) -> list:
    """``(ids, labels)`` lists for multi-target samples, at most ``L`` long."""
    L = max_source_length + max_target_length + 1
    prefix, eos = tokenizer.prefix_tokens, tokenizer.eos_token_id
    starts = [0] * len(samples)

    def encode(idx):
        segs = [_conversation_segments(samples[i], starts[i]) for i in idx]
        flat_c = tokenizer.encode_batch([c for sg in segs for c, _, _ in sg], add_special_tokens=False)
        flat_a = tokenizer.encode_batch([a for sg in segs for _, a, _ in sg], add_special_tokens=False)
        out, k = [], 0
        for sg in segs:
            out.append([(flat_c[k + j], flat_a[k + j], sg[j][2]) for j in range(len(sg))])
            k += len(sg)
        return out

    def total(parts):
        return len(prefix) + sum(len(c) + len(a) for c, a, _ in parts) + 1

    enc = encode(range(len(samples)))
    if mode == "rounds":
        while True:
            todo = [i for i, p in enumerate(enc) if total(p) > L and starts[i] < len(samples[i].rounds) - 1]
            if not todo:
                break
            for i in todo:
                starts[i] += 1
            for i, p in zip(todo, encode(todo)):
                enc[i] = p
    out = []
    for parts in enc:
        if mode == "rounds" and total(parts) > L:   # one round left: cut as a prompt/answer pair
            (c, a, loss), = parts
            c = _fit_prompt(tokenizer, prefix + c, max_source_length)[len(prefix):]
            parts = [(c, a[:max_target_length], loss)]
        ids, lab = list(prefix), [IGNORE_INDEX] * len(prefix)
        for c, a, loss in parts:
            ids += c
            lab += [IGNORE_INDEX] * len(c)
            ids += a
            lab += a if loss else [IGNORE_INDEX] * len(a)
        ids.append(eos)
        lab.append(eos if parts[-1][2] else IGNORE_INDEX)
        out.append((ids[:L], lab[:L]))
    return out


def build_train_features(samples: Sequence, tokenizer, mode: str = "official", max_source_length: int = 64,
                         max_target_length: int = 128, progress: bool = False) -> dict:
    """Train features of ``samples`` (see the module docstring).

    Returns ``{"input_ids": int64 [N, L], "labels": int64 [N, L], "lengths": int64 [N]}`` with
    ``L = max_source_length + max_target_length + 1``.
    """
    _check(mode, max_source_length, max_target_length)
    n = len(samples)
    L = max_source_length + max_target_length + 1
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    input_ids = np.full((n, L), pad, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    label_from = np.zeros(n, dtype=np.int64)    # labels = input_ids from this column on ...
    explicit = {}                               # ... except rows with labels of their own (conversations)
    bar = _progress(n, "features", progress)
    for lo in range(0, n, _CHUNK):
        chunk = samples[lo:lo + _CHUNK]
        single, multi, text = [], [], []
        for i, s in enumerate(chunk):
            if s.text is not None:
                text.append(i)
            elif (len(s.rounds) == 1 and s.rounds[0].loss) or s.single_target:
                single.append(i)
            else:
                multi.append(i)
        if single:
            sam = [chunk[i] for i in single]
            A = _encode_prompts(sam, tokenizer, mode, max_source_length)
            B = tokenizer.encode_batch([s.answer for s in sam], add_special_tokens=False)
            for i, a, b in zip(single, A, B):
                row = a + b[:max_target_length]
                row.append(eos)
                r, m = lo + i, len(row)
                input_ids[r, :m] = row
                label_from[r] = len(a)
                lengths[r] = m
        if multi:
            conv = _encode_conversations([chunk[i] for i in multi], tokenizer, mode, max_source_length,
                                         max_target_length)
            for i, (ids, lab) in zip(multi, conv):
                input_ids[lo + i, :len(ids)] = ids
                explicit[lo + i] = lab
                lengths[lo + i] = len(ids)
        if text:
            T = tokenizer.encode_batch([chunk[i].text for i in text], add_special_tokens=False)
            pre = tokenizer.prefix_tokens
            for i, t in zip(text, T):
                row = (pre + t)[:L - 1] + [eos]
                input_ids[lo + i, :len(row)] = row
                label_from[lo + i] = len(pre)
                lengths[lo + i] = len(row)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    labels = np.where(np.arange(L)[None, :] >= label_from[:, None], input_ids, pad)
    for r, lab in explicit.items():
        labels[r, :len(lab)] = lab
    labels[labels == pad] = IGNORE_INDEX     # as the official code: every pad id in labels is ignored
    return {"input_ids": input_ids, "labels": labels, "lengths": lengths}


def build_eval_features(samples: Sequence, tokenizer, mode: str = "official", max_source_length: int = 64,
                        padding: str = "max_length") -> dict:
    """Prompts of the last rounds, left-padded, and their reference answers.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (int64 ``[N, P]``; ``P`` is
    ``max_source_length`` for ``padding="max_length"`` or the longest prompt for ``"longest"``) and
    ``answers`` (list of N str). Prompts are truncated by ``mode`` as in :func:`build_train_features`.
    """
    _check(mode, max_source_length, 3)
    if padding not in ("max_length", "longest"):
        raise ValueError(f"padding: expected 'max_length' or 'longest', got {padding!r}")
    for s in samples:
        if s.is_text:
            raise ValueError(f"{s.where}: plain text has no reference answer to evaluate against")
    A = _encode_prompts(list(samples), tokenizer, mode, max_source_length)
    P = max_source_length if padding == "max_length" else max((len(a) for a in A), default=0)
    n = len(A)
    ids = np.full((n, P), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((n, P), dtype=np.int64)
    pos = np.zeros((n, P), dtype=np.int64)
    for i, a in enumerate(A):
        k = len(a)
        if k:
            ids[i, P - k:] = a
            mask[i, P - k:] = 1
            pos[i, P - k:] = np.arange(k)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
            "answers": [s.answer for s in samples]}


def length_stats(samples: Sequence, tokenizer, max_source_length: int = 64, max_target_length: int = 128,
                 percentiles=(50, 90, 95, 99, 100)) -> dict:
    """Token lengths before truncation and how many rows the limits would cut.

    Prompt = the last round's full prompt with ``[gMASK] sop`` (plain text: the whole text), answer =
    trained response tokens (0 for plain text), total = the untruncated feature length.
    """
    single = [s for s in samples if not s.is_text]
    texts = [s for s in samples if s.is_text]
    P = [len(a) for a in tokenizer.encode_batch(_prompts(single, [0] * len(single)))]
    A = [len(b) for b in tokenizer.encode_batch([s.answer for s in single], add_special_tokens=False)]
    big = 10 ** 9
    conv = _encode_conversations([s for s in single if not s.single_target], tokenizer, "official", big, big)
    totals = [p + a + 1 for p, a, s in zip(P, A, single) if s.single_target] + [len(i) for i, _ in conv]
    T = [len(t) + 3 for t in tokenizer.encode_batch([s.text for s in texts], add_special_tokens=False)]
    L = max_source_length + max_target_length + 1
    pct = lambda xs: {p: int(np.percentile(xs, p)) for p in percentiles} if xs else {}
    cut_src = sum(p > max_source_length for p in P)
    cut_tgt = sum(a > max_target_length for a in A)
    cut_rows = sum((p > max_source_length) or (a > max_target_length) for p, a in zip(P, A))
    return {"rows": len(samples), "prompt_tokens": pct(P), "answer_tokens": pct(A),
            "total_tokens": pct(totals + T), "max_length": L, "prompts_cut": int(cut_src),
            "answers_cut": int(cut_tgt), "rows_cut": int(cut_rows) + sum(t > L for t in T)}


def save_features(path: str, features: dict, **meta) -> None:
    """Write the array features to ``path`` (``.npz``) atomically; ``meta`` values are stored too."""
    arrays = {k: np.asarray(v) for k, v in features.items() if isinstance(v, np.ndarray)}
    for k, v in meta.items():
        arrays[f"meta_{k}"] = np.asarray(v)
    try:
        with atomic_file(path, "wb") as f:  # (an OutputError naming ``path`` if it cannot be written)
            np.savez(f, **arrays)
    except ValueError as e:  # zipfile reports a write failure (disk full) as "seek of closed file"
        raise OutputError(f"{path}: cannot write: {e}") from None


def load_features(path: str) -> dict:
    """Arrays written by :func:`save_features` (or ``python -m glm_common.data features``)."""
    with np.load(path) as z:
        out = {k: z[k] for k in z.files if not k.startswith("meta_")}
    for key in ("input_ids", "labels"):
        if key not in out:
            raise ValueError(f"{path}: no {key!r} array (expected a features .npz)")
    if "lengths" not in out:
        out["lengths"] = _lengths_from(out["input_ids"], out["labels"])
    return out


def _lengths_from(input_ids, labels):
    """Real lengths of right-padded rows: up to the last token that is not pad, or carries a label."""
    real = (input_ids != 0) | (labels != IGNORE_INDEX)
    L = input_ids.shape[1]
    last = L - np.argmax(real[:, ::-1], axis=1)
    return np.where(real.any(axis=1), last, 0).astype(np.int64)


def _progress(total, desc, enabled):
    if not enabled or total < _CHUNK:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="rows")
