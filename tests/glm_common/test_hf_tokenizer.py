"""The transformers wrapper gives exactly the ids of ChatGLM2Tokenizer (golden cases) and loads via AutoTokenizer."""
import json

import pytest

from tests.conftest import TOKENIZER_CASES

CASES = json.loads(TOKENIZER_CASES.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from convert.hf_layout import write_tiny_hf_dir
    return write_tiny_hf_dir(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    import glm_common.hf_tokenizer  # noqa: F401  (registers ChatGLMTokenizer)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(hf_dir)


def test_autotokenizer_loads_our_class(hf_tok):
    from glm_common.hf_tokenizer import ChatGLMTokenizer
    assert isinstance(hf_tok, ChatGLMTokenizer)
    assert hf_tok.padding_side == "left"
    assert (hf_tok.vocab_size, hf_tok.pad_token_id, hf_tok.eos_token_id) == (3005, 0, 2)


def test_golden_cases_through_transformers(hf_tok):
    for case in CASES["encode"]:
        assert hf_tok(case["text"])["input_ids"] == case["ids_with_special"]
        assert hf_tok.tokenize(case["text"]) == case["pieces"]
    for case in CASES["decode"]:
        assert hf_tok.decode(case["ids"]) == case["text"]
    for case in CASES["prompt"]:
        assert hf_tok.build_prompt(case["query"], case["history"]) == case["prompt"]
    batch = CASES["batch"]
    out = hf_tok(batch["texts"], padding=True)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert out[key] == batch[key], key


def test_save_pretrained_round_trip(hf_tok, tmp_path):
    from transformers import AutoTokenizer
    hf_tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode("你好") == CASES["encode"][0]["ids_with_special"]


def test_seq2seq_collator_pads_left(hf_tok):
    from transformers import DataCollatorForSeq2Seq
    collate = DataCollatorForSeq2Seq(hf_tok, padding=True, label_pad_token_id=-100, return_tensors="np")
    out = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [9], "labels": [9]}])
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, 7], [-100, -100, 9]]
