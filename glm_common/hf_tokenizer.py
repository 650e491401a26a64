"""A transformers ``PreTrainedTokenizer`` for ChatGLM2 that delegates to :class:`ChatGLM2Tokenizer`.

For torch users: transformers' Trainer, data collators and ``AutoTokenizer``::

    import glm_common.hf_tokenizer                  # registers the class with AutoTokenizer
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained("path/to/chatglm2-6b")   # tokenizer_class: ChatGLMTokenizer

The class is named ``ChatGLMTokenizer`` as in ChatGLM2's ``tokenizer_config.json``, so directories
written by HF or by this project load without ``trust_remote_code``. Every id comes from
:class:`glm_common.tokenizer.ChatGLM2Tokenizer`; nothing is tokenized twice in two ways.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizer

from glm_common.tokenizer import ChatGLM2Tokenizer, VOCAB_FILE

__all__ = ["ChatGLMTokenizer", "ChatGLMConfig"]


class ChatGLMConfig(PretrainedConfig):
    """Minimal ``model_type: chatglm`` config so ``AutoTokenizer`` can map ChatGLM2 directories."""

    model_type = "chatglm"


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file, padding_side="left", clean_up_tokenization_spaces=False, **kwargs):
        self.vocab_file = vocab_file
        self.glm = ChatGLM2Tokenizer(vocab_file)
        kwargs.pop("eos_token", None), kwargs.pop("pad_token", None), kwargs.pop("unk_token", None)
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         **kwargs)

    # special tokens as the reference exposes them
    @property
    def unk_token(self) -> str:
        return "<unk>"

    @unk_token.setter
    def unk_token(self, value):
        pass

    @property
    def pad_token(self) -> str:
        return "<unk>"

    @pad_token.setter
    def pad_token(self, value):
        pass

    @property
    def pad_token_id(self) -> int:
        return self.glm.pad_token_id

    @property
    def eos_token(self) -> str:
        return "</s>"

    @eos_token.setter
    def eos_token(self, value):
        pass

    @property
    def eos_token_id(self) -> int:
        return self.glm.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.glm.vocab_size

    def get_command(self, token: str) -> int:
        return self.glm.get_command(token)

    def build_prompt(self, query: str, history=None) -> str:
        return self.glm.build_prompt(query, history)

    def get_vocab(self) -> dict:
        vocab = self.glm.get_vocab()
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.glm.tokenize(text)

    def _convert_token_to_id(self, token):
        return self.glm.convert_token_to_id(token)

    def _convert_id_to_token(self, index):
        return self.glm.convert_id_to_token(index)

    def convert_tokens_to_string(self, tokens) -> str:
        return self.glm.sp_model.decode_pieces([t for t in tokens if t])

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.glm.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text, text_pair=None, add_special_tokens=True, **kwargs):
        if text_pair is None and isinstance(text, str) and not kwargs:
            return self.glm.encode(text, add_special_tokens=add_special_tokens)
        return super().encode(text, text_pair=text_pair, add_special_tokens=add_special_tokens, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return self.glm.build_inputs_with_special_tokens(token_ids_0, token_ids_1)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None):
        if not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory}: not a directory")
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=None, pad_to_multiple_of=None,
             padding_side=None, return_attention_mask=None, **kwargs) -> dict:
        """Left padding with ``position_ids`` (0 on pads), as the reference ChatGLM2 tokenizer does."""
        from transformers.utils import PaddingStrategy

        ids = encoded_inputs[self.model_input_names[0]]
        n = len(ids)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = n
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        if "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * n
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(n))
        if padding_strategy != PaddingStrategy.DO_NOT_PAD and max_length is not None and n < max_length:
            pad = max_length - n
            encoded_inputs["attention_mask"] = [0] * pad + list(encoded_inputs["attention_mask"])
            encoded_inputs["position_ids"] = [0] * pad + list(encoded_inputs["position_ids"])
            encoded_inputs["input_ids"] = [self.pad_token_id] * pad + list(ids)
            if "labels" in encoded_inputs:
                encoded_inputs["labels"] = [-100] * pad + list(encoded_inputs["labels"])
        return encoded_inputs


def _register():
    try:
        AutoConfig.register("chatglm", ChatGLMConfig)
    except ValueError:  # already registered (a second import, or a transformers that knows chatglm)
        pass
    try:
        AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer)
    except ValueError:
        pass


_register()
