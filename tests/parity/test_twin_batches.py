"""The same run YAML gives the same training batches in both backends, for every data format and feature mode
the pipeline supports (and every padding): ``mindspore_glm.train.train_data`` (a ``GeneratorDataset``) and
``torch_glm.train.train_data`` (a ``DataLoader``), the functions each trainer reads its batches from, yield
equal ``input_ids`` and ``labels``, and each backend's ``build_attention_mask`` gives the same attention
for them. The expected rows are also checked against glm_common's features built independently from the
YAML's keys (a backend that dropped ``data_format``/``feature_mode``/``padding`` fails here).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from glm_common.data import Batcher, build_train_features, load_samples
from glm_common.data.batching import PADDINGS
from glm_common.data.features import MODES
from glm_common.data.formats import FORMATS
from glm_common.run_config import settings_from_config
from glm_common.tokenizer import ChatGLM2Tokenizer
from tests.conftest import ROOT, TOKENIZER_MODEL

ROWS = {
    "adgen": [{"content": f"类型#上衣*颜色#白色*风格#简约{i}", "summary": "简约的白色上衣，" * (1 + i % 3)} for i in range(7)],
    "instruction": [{"instruction": f"Name {i} colors.", "input": "primary" if i % 2 else "",
                     "output": "Red, blue and yellow. " * (1 + i % 2)} for i in range(7)],
    "chat": [{"prompt": f"那上海呢？{i}", "response": "上海今天多云。",
              "history": [["北京今天天气怎么样？", "北京今天晴。"]] * (i % 2)} for i in range(7)],
    "session": [{"prompt": ["Hi, who are you?", f"你能做什么？{i}"], "response": ["I am ChatGLM2.", "我可以回答问题。"]}
                for i in range(7)],
    "messages": [{"messages": [{"role": "system", "content": "You are helpful."},
                               {"role": "user", "content": f"Question {i}?"},
                               {"role": "assistant", "content": "Answer " * (1 + i % 3)}]} for i in range(7)],
    "context_target": [{"context": f"Instruction: 介绍一下长城 {i}\nAnswer: ", "target": "长城是中国古代的军事防御工程。"}
                       for i in range(7)],
    "text": [{"text": f"ChatGLM2 is a bilingual chat model. {i} " * (1 + i % 3)} for i in range(7)],
}


def test_every_format_has_rows():
    assert set(ROWS) == set(FORMATS)


def _settings(tmp_path, fmt: str, mode: str, padding: str):
    cfg = yaml.safe_load((ROOT / "configs" / "tiny" / "run_tiny_lora.yaml").read_text())
    data = tmp_path / f"{fmt}.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS[fmt]) + "\n", encoding="utf-8")
    ds = cfg["train_dataset"]
    ds["data_loader"].update(dataset_dir=str(data), format=fmt, mode=mode, shuffle=True)
    ds["tokenizer"]["vocab_file"] = str(TOKENIZER_MODEL)
    ds["padding"] = padding
    ds["max_source_length"], ds["max_target_length"] = 24, 16
    cfg["model"]["model_config"]["seq_length"] = 64
    cfg["runner_config"]["batch_size"] = 2
    cfg["output_dir"] = str(tmp_path / "out")
    return settings_from_config(cfg, source="run.yaml", warn=False)


def _ms_batches(s, tokenizer, epoch):
    from mindspore_glm.train import train_data
    ds = train_data(s, tokenizer)
    ds.source.set_epoch(epoch)
    return [tuple(np.asarray(c) for c in row) for row in ds.create_tuple_iterator(num_epochs=1, output_numpy=True)]


def _pt_batches(s, tokenizer, epoch):
    from torch_glm.train import train_data
    loader = train_data(s, tokenizer)
    loader.sampler.set_epoch(epoch)
    return [(b["input_ids"].numpy(), b["labels"].numpy()) for b in loader]


def _attention(ids, pad_id):
    """Each backend's build_attention_mask over the batch's padding (1 token / 0 pad)."""
    import mindspore as ms
    import torch
    from mindspore_glm.model import build_attention_mask as ms_mask
    from torch_glm.model import build_attention_mask as pt_mask
    keep = (ids != pad_id).astype(np.int32)
    a = ms_mask(ms.Tensor(keep), ids.shape[1], 0).asnumpy()
    b = pt_mask(torch.from_numpy(keep), ids.shape[1], 0).numpy()
    return a, b


#: every format in every feature mode; the paddings take turns so that each one is run with several formats
CASES = [(fmt, mode, PADDINGS[(i * len(MODES) + j) % len(PADDINGS)])
         for i, fmt in enumerate(FORMATS) for j, mode in enumerate(MODES)]


def test_cases_cover_every_padding():
    assert {p for _, _, p in CASES} == set(PADDINGS)


@pytest.mark.parametrize("fmt,mode,padding", CASES, ids=[f"{f}-{m}-{p}" for f, m, p in CASES])
def test_same_yaml_same_batches(tmp_path, fmt, mode, padding):
    s = _settings(tmp_path, fmt, mode, padding)
    assert (s.data_format, s.feature_mode, s.padding) == (fmt, mode, padding)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(s.vocab_file)
    # what the YAML asks for, built directly with glm_common (no backend, no run-settings helper)
    feats = build_train_features(load_samples(s.train_file, fmt), tokenizer, mode=mode, max_source_length=24,
                                 max_target_length=16)
    expected = Batcher(feats, 2, shuffle=True, seed=s.data_seed, padding=padding, epoch=1)
    want = [(b["input_ids"], b["labels"]) for b in (expected.batch(k, 1) for k in range(len(expected.plan(1))))]
    ms_b, pt_b = _ms_batches(s, tokenizer, 1), _pt_batches(s, tokenizer, 1)
    assert len(ms_b) == len(pt_b) == len(want) > 0
    for (mi, ml), (ti, tl), (wi, wl) in zip(ms_b, pt_b, want):
        np.testing.assert_array_equal(mi, ti)
        np.testing.assert_array_equal(ml, tl)
        np.testing.assert_array_equal(mi, wi)
        np.testing.assert_array_equal(ml, wl)
        a, b = _attention(mi, tokenizer.pad_token_id)
        np.testing.assert_array_equal(a, b)
