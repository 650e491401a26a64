"""ChatGLM2Tokenizer against every golden tokenizer case, plus padding, save/load and bad files."""
import json
import os
import shutil

import numpy as np
import pytest

from glm_common.tokenizer import ChatGLM2Tokenizer, TokenizerError
from tests.conftest import TOKENIZER_CASES, TOKENIZER_MODEL

CASES = json.loads(TOKENIZER_CASES.read_text(encoding="utf-8"))


def test_vocabulary_and_special_ids(tokenizer):
    assert tokenizer.vocab_size == CASES["vocab_size"] == len(tokenizer)
    for token, idx in CASES["special"].items():
        assert tokenizer.get_command(token) == idx
    assert tokenizer.bos_token_id == CASES["bos_id"]
    assert tokenizer.eos_token_id == CASES["eos_id"] == tokenizer.get_command("<eos>")
    assert tokenizer.pad_token_id == CASES["pad_id"] == tokenizer.get_command("<pad>")
    with pytest.raises(KeyError, match="not a special token"):
        tokenizer.get_command("[NOPE]")


@pytest.mark.parametrize("case", CASES["encode"], ids=lambda c: repr(c["text"][:20]))
def test_encode_golden(tokenizer, case):
    assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids"]
    assert tokenizer.encode(case["text"]) == case["ids_with_special"]
    assert tokenizer.tokenize(case["text"]) == case["pieces"]


def test_encode_batch_equals_encode(tokenizer):
    texts = [c["text"] for c in CASES["encode"]]
    assert tokenizer.encode_batch(texts) == [c["ids_with_special"] for c in CASES["encode"]]
    assert tokenizer.encode_batch(texts, add_special_tokens=False) == [c["ids"] for c in CASES["encode"]]


@pytest.mark.parametrize("case", CASES["decode"], ids=lambda c: str(c["ids"][:6]))
def test_decode_golden(tokenizer, case):
    assert tokenizer.decode(case["ids"]) == case["text"]
    if "text_skip_special" in case:
        assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["text_skip_special"]
    assert tokenizer.decode(np.asarray(case["ids"], dtype=np.int64)) == case["text"]


@pytest.mark.parametrize("case", CASES["prompt"], ids=lambda c: c["query"])
def test_build_prompt_golden(tokenizer, case):
    history = [tuple(h) for h in case["history"]]
    prompt = tokenizer.build_prompt(case["query"], history)
    assert prompt == case["prompt"]
    assert tokenizer.encode(prompt) == case["input_ids"]


def test_batch_left_padding_golden(tokenizer):
    batch = CASES["batch"]
    out = tokenizer(batch["texts"], padding=True)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert out[key] == batch[key], key
    arrays = tokenizer(batch["texts"], padding=True, return_tensors="np")
    assert arrays["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(arrays["position_ids"], np.asarray(batch["position_ids"]))


def test_call_single_and_max_length(tokenizer):
    single = tokenizer("你好")
    assert single["input_ids"] == CASES["encode"][0]["ids_with_special"]
    assert single["position_ids"] == list(range(len(single["input_ids"])))
    padded = tokenizer(["你好"], padding="max_length", max_length=8)
    assert padded["input_ids"][0] == [0, 0, 0] + CASES["encode"][0]["ids_with_special"]
    assert padded["attention_mask"][0] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert padded["position_ids"][0] == [0, 0, 0, 0, 1, 2, 3, 4]
    cut = tokenizer(["你好"], truncation=True, max_length=3)
    assert cut["input_ids"][0] == CASES["encode"][0]["ids_with_special"][:3]
    with pytest.raises(ValueError, match="longer than the padded length"):
        tokenizer(["你好"], padding="max_length", max_length=2)
    with pytest.raises(ValueError, match="needs padding"):
        tokenizer(["你好", "类型#裤*版型#宽松"], return_tensors="np")


def test_special_token_text_is_not_special(tokenizer):
    ids = tokenizer.encode("[gMASK]sop", add_special_tokens=False)
    assert tokenizer.get_command("[gMASK]") not in ids and tokenizer.get_command("sop") not in ids


def test_save_and_from_pretrained_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.model", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["padding_side"] == "left" and cfg["tokenizer_class"] == "ChatGLMTokenizer"
    again = ChatGLM2Tokenizer.from_pretrained(tmp_path)
    for case in CASES["encode"]:
        assert again.encode(case["text"]) == case["ids_with_special"]


def test_missing_tokenizer_model(tmp_path):
    with pytest.raises(TokenizerError) as e:
        ChatGLM2Tokenizer(tmp_path / "tokenizer.model")
    assert str(tmp_path / "tokenizer.model") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TokenizerError, match="has no tokenizer.model"):
        ChatGLM2Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("content", [b"", b"this is not a sentencepiece model", None], ids=["empty", "text", "truncated"])
def test_corrupt_tokenizer_model(tmp_path, content):
    bad = tmp_path / "tokenizer.model"
    if content is None:
        content = TOKENIZER_MODEL.read_bytes()[:1000]
    bad.write_bytes(content)
    with pytest.raises(TokenizerError) as e:
        ChatGLM2Tokenizer(bad)
    msg = str(e.value)
    assert msg.startswith(str(bad)) and "\n" not in msg


def test_bad_tokenizer_config(tmp_path):
    shutil.copyfile(TOKENIZER_MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text('{"padding_side": "right"}')
    with pytest.raises(TokenizerError, match="padding_side"):
        ChatGLM2Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"padding_side": ')
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json:1: not valid JSON"):
        ChatGLM2Tokenizer.from_pretrained(tmp_path)
