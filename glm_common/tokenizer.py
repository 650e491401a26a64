"""The ChatGLM2 tokenizer: SentencePiece plus five special tokens, numpy only.

``ChatGLM2Tokenizer`` reproduces the public ChatGLM2 tokenizer exactly (ids, prompts, left padding)
with the API users know from it::

    tok = ChatGLM2Tokenizer.from_pretrained("path/to/chatglm2-6b")     # or ChatGLM2Tokenizer(vocab_file)
    ids = tok.encode("你好")                                            # [gMASK, sop] + pieces
    batch = tok([tok.build_prompt("你好")], padding=True, return_tensors="np")

Both backends and the data pipeline use this class; ``glm_common.hf_tokenizer`` wraps it for
transformers' Trainer and ``AutoTokenizer``.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Optional, Sequence

import numpy as np

from glm_common.fsutil import atomic_path, atomic_write_text
from glm_common.prompt import build_prompt as _build_prompt

__all__ = ["ChatGLM2Tokenizer", "TokenizerError", "SPECIAL_TOKENS", "VOCAB_FILE", "TOKENIZER_CONFIG_FILE"]

#: special tokens appended after the SentencePiece vocabulary, in id order.
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
VOCAB_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message is one line naming the file."""


def _load_sentencepiece(vocab_file: str):
    import sentencepiece as spm

    if not os.path.isfile(vocab_file):
        raise TokenizerError(f"{vocab_file}: no such file (expected a SentencePiece tokenizer.model)")
    if os.path.getsize(vocab_file) == 0:
        raise TokenizerError(f"{vocab_file}: empty file (expected a SentencePiece tokenizer.model)")
    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(vocab_file)
    except (RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"{vocab_file}: not a valid SentencePiece model ({first})") from None
    if not ok or sp.vocab_size() <= 0:
        raise TokenizerError(f"{vocab_file}: not a valid SentencePiece model")
    return sp


class ChatGLM2Tokenizer:
    """ChatGLM2's tokenizer.

    Ids: ``0..n-1`` are SentencePiece pieces (``n = sp.vocab_size()``), then ``[MASK] [gMASK] [sMASK]
    sop eop`` are ``n..n+4``. bos/eos are SentencePiece's, pad is unk (id 0). Text is never scanned for
    special tokens: a literal ``"[gMASK]"`` in user text is encoded as ordinary pieces.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(self, vocab_file: str | os.PathLike, **kwargs):
        self.vocab_file = os.fspath(vocab_file)
        self.sp_model = _load_sentencepiece(self.vocab_file)
        self.n_sp = self.sp_model.vocab_size()
        self.bos_token_id = self.sp_model.bos_id()
        self.eos_token_id = self.sp_model.eos_id()
        self.pad_token_id = self.sp_model.unk_id()
        self.special_tokens = {tok: self.n_sp + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.index_special_tokens = {i: tok for tok, i in self.special_tokens.items()}
        self._commands = {"<bos>": self.bos_token_id, "<eos>": self.eos_token_id, "<pad>": self.pad_token_id}
        self._commands.update(self.special_tokens)
        self.prefix_tokens = [self.special_tokens["[gMASK]"], self.special_tokens["sop"]]
        # ids that decode to "" (specials, bos/eos/pad), as in the reference tokenizer
        self._silent = set(self.index_special_tokens) | {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        self.init_kwargs = dict(kwargs)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "ChatGLM2Tokenizer":
        """Load from a directory holding ``tokenizer.model`` (HF or our layout), or a model file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            vocab = os.path.join(path, VOCAB_FILE)
            if not os.path.isfile(vocab):
                raise TokenizerError(f"{vocab}: no such file (the directory {path} has no tokenizer.model)")
            cfg_file = os.path.join(path, TOKENIZER_CONFIG_FILE)
            if os.path.isfile(cfg_file):
                try:
                    with open(cfg_file, encoding="utf-8-sig") as f:
                        saved = json.load(f)
                except json.JSONDecodeError as e:
                    raise TokenizerError(f"{cfg_file}:{e.lineno}: not valid JSON: {e.msg}") from None
                side = saved.get("padding_side", "left")
                if side != "left":
                    raise TokenizerError(f"{cfg_file}: padding_side: ChatGLM2 pads on the left, got {side!r}")
            return cls(vocab, **kwargs)
        return cls(path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, str]:
        """Write ``tokenizer.model`` and ``tokenizer_config.json``; return their paths."""
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        vocab_out = os.path.join(save_directory, VOCAB_FILE)
        if os.path.abspath(vocab_out) != os.path.abspath(self.vocab_file):
            with atomic_path(vocab_out) as tmp:
                shutil.copyfile(self.vocab_file, tmp)
        cfg_out = os.path.join(save_directory, TOKENIZER_CONFIG_FILE)
        cfg = {"tokenizer_class": "ChatGLMTokenizer", "padding_side": "left", "remove_space": False,
               "do_lower_case": False, "clean_up_tokenization_spaces": False,
               "model_max_length": 1000000000000000019884624838656}
        atomic_write_text(cfg_out, json.dumps(cfg, indent=2) + "\n")
        return vocab_out, cfg_out

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus the five special tokens."""
        return self.n_sp + len(SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    def get_command(self, token: str) -> int:
        """Id of a special token: ``[MASK] [gMASK] [sMASK] sop eop <bos> <eos> <pad>``."""
        try:
            return self._commands[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token of ChatGLM2 "
                           f"(known: {', '.join(self._commands)})") from None

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.n_sp)}
        vocab.update(self.special_tokens)
        return vocab

    def convert_token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp_model.piece_to_id(token)

    def convert_id_to_token(self, index: int) -> str:
        """Piece of ``index``; specials, bos, eos, pad and out-of-range ids give ``""`` as in the reference."""
        if index in self._silent or index < 0 or index >= self.n_sp:
            return ""
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.convert_token_to_id(tokens)
        return [self.convert_token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, (int, np.integer)):
            return self.convert_id_to_token(int(ids))
        return [self.convert_id_to_token(int(i)) for i in ids]

    # ------------------------------------------------------------------ text <-> ids
    def tokenize(self, text: str) -> list[str]:
        """SentencePiece pieces of ``text`` (no special tokens)."""
        return self.sp_model.encode(text, out_type=str)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``[gMASK, sop] + pieces`` (or the pieces alone)."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        ids = self.sp_model.encode(text)
        return self.prefix_tokens + ids if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` over many texts in one SentencePiece call."""
        out = self.sp_model.encode(list(texts))
        return [self.prefix_tokens + ids for ids in out] if add_special_tokens else out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, array or tensor of ints; a 2-D input gives a list of texts).

        Special ids, bos, eos and pad decode to ``""`` whether or not ``skip_special_tokens`` is set,
        as the reference ChatGLM2 tokenizer does; the flag is accepted for API compatibility.
        """
        ids = _to_list(ids)
        if ids and isinstance(ids[0], list):
            return [self.decode(row, skip_special_tokens) for row in ids]
        keep = [i for i in ids if i not in self._silent and 0 <= i < self.n_sp]
        return self.sp_model.decode(keep)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in _to_list(sequences)]

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def build_prompt(query: str, history: Optional[Iterable] = None) -> str:
        """The ChatGLM2 chat prompt: past rounds ``[Round i]\\n\\n问：q\\n\\n答：a\\n\\n`` then the query."""
        return _build_prompt(query, history)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None):
        """``[gMASK, sop] + a`` or ``[gMASK, sop] + a + b + [eos]`` (the reference pairing)."""
        out = self.prefix_tokens + list(token_ids_0)
        if token_ids_1 is not None:
            out = out + list(token_ids_1) + [self.eos_token_id]
        return out

    # ------------------------------------------------------------------ batching
    def __call__(self, text, padding=False, max_length: Optional[int] = None, truncation: bool = False,
                 add_special_tokens: bool = True, return_tensors: Optional[str] = None):
        """Encode one text or a list; returns ``input_ids``, ``attention_mask``, ``position_ids``.

        ``padding``: False (no padding), True / ``"longest"`` (to the longest row) or ``"max_length"``;
        padding is on the LEFT with pad id 0, mask 0 and position 0; real tokens get positions 0..n-1.
        ``truncation`` keeps the first ``max_length`` ids. ``return_tensors="np"`` gives int64 arrays
        (padding required for a list).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text[{i}]: expected a str, got {type(t).__name__}")
        rows = self.encode_batch(texts, add_special_tokens=add_special_tokens)
        if truncation:
            if max_length is None:
                raise ValueError("truncation=True needs max_length")
            rows = [r[:max_length] for r in rows]
        if padding is True or padding == "longest":
            target = max((len(r) for r in rows), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
        elif padding in (False, None, "do_not_pad"):
            target = None
        else:
            raise ValueError(f"padding: expected True, False, 'longest' or 'max_length', got {padding!r}")
        out = self.pad({"input_ids": rows}, target) if target is not None else {
            "input_ids": rows, "attention_mask": [[1] * len(r) for r in rows],
            "position_ids": [list(range(len(r))) for r in rows]}
        if return_tensors == "np":
            if target is None and len({len(r) for r in rows}) > 1:
                raise ValueError("return_tensors='np' with rows of different lengths needs padding=True")
            out = {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}
        elif return_tensors is not None:
            raise ValueError(f"return_tensors: only 'np' is supported here, got {return_tensors!r} "
                             "(glm_common.hf_tokenizer gives 'pt')")
        if single and return_tensors is None:
            out = {k: v[0] for k, v in out.items()}
        return out

    def pad(self, features: dict, length: int) -> dict:
        """Left-pad ``features["input_ids"]`` rows to ``length``; rows longer than it are an error."""
        ids_out, mask_out, pos_out = [], [], []
        for i, row in enumerate(features["input_ids"]):
            row = list(row)
            n = len(row)
            if n > length:
                raise ValueError(f"row {i} has {n} tokens, longer than the padded length {length}")
            pad = length - n
            ids_out.append([self.pad_token_id] * pad + row)
            mask_out.append([0] * pad + [1] * n)
            pos_out.append([0] * pad + list(range(n)))
        return {"input_ids": ids_out, "attention_mask": mask_out, "position_ids": pos_out}


def _to_list(ids):
    """A python list (of ints, or of lists) from a list, array, torch or MindSpore tensor."""
    if hasattr(ids, "asnumpy"):
        ids = ids.asnumpy()
    if hasattr(ids, "tolist"):
        return ids.tolist()
    return [x.tolist() if hasattr(x, "tolist") else _to_list(x) if isinstance(x, (list, tuple)) else int(x)
            for x in ids]
