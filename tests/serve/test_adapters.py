"""Serving a fine-tuned adapter: a peft LoRA directory (torch) and a MindSpore LoRA ``.ckpt`` (the same
adapter converted by ``convert/adapters.py peft-to-ms``) are merged on load and answer as the unmerged
model's own greedy ``chat()`` (peft's model for torch; the MindSpore model with the adapter applied, which
must answer as peft's); a P-tuning prefix ``.ckpt`` (``prefix-to-ms``) answers as the torch P-tuning model."""
import subprocess
import sys

import pytest
import torch

from glm_serve.backends import load_backend
from tests.conftest import ROOT, TINY_MODEL, TOKENIZER_MODEL
from tests.serve.conftest import serving
from tests.serve.test_api import _client

QUERY = "类型#裙*颜色#蓝色"


def _peft_adapter(path):
    """A trained-looking peft LoRA adapter (r 4, alpha 16; B drawn, as it starts at zero) saved at ``path``."""
    from torch_glm.lora import apply_lora, save_lora
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    base = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
    peft_model = apply_lora(base, r=4, lora_alpha=16, lora_dropout=0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_lora(peft_model, path)
    return peft_model.eval()


def _served_answer(b, n):
    with serving(b) as (url, _):
        r = _client(url).chat.completions.create(model=b.model_id, max_tokens=n, temperature=0,
                                                 messages=[{"role": "user", "content": QUERY}])
    return r.choices[0].message.content


def test_torch_lora_adapter(tmp_path):
    peft_model = _peft_adapter(tmp_path / "adapter")
    b = load_backend("torch", str(TINY_MODEL), str(TOKENIZER_MODEL), adapter=str(tmp_path / "adapter"))
    want = peft_model.chat(b.tokenizer, QUERY, max_new_tokens=16, do_sample=False)[0]
    plain = b.model.__class__.from_pretrained(TINY_MODEL).chat(b.tokenizer, QUERY, max_new_tokens=16,
                                                              do_sample=False)[0]
    assert want != plain                          # the adapter changes the answer
    assert b.model_id == "adapter"
    assert _served_answer(b, 16) == want


@pytest.mark.slow
def test_mindspore_lora_adapter(tmp_path):
    """MindSpore compiles its prefill/decode graphs for the reference and for the server: minutes on CPU."""
    n = 12
    peft_model = _peft_adapter(tmp_path / "peft")
    run = dict(check=True, capture_output=True, cwd=str(ROOT))
    subprocess.run([sys.executable, "convert/hf_to_ms.py", "--hf-dir", str(TINY_MODEL), "--output",
                    str(tmp_path / "base" / "tiny.ckpt")], **run)
    (tmp_path / "base" / "config.json").write_bytes((TINY_MODEL / "config.json").read_bytes())
    subprocess.run([sys.executable, "convert/adapters.py", "peft-to-ms", "--adapter", str(tmp_path / "peft"),
                    "--output", str(tmp_path / "lora.ckpt")], **run)
    assert (tmp_path / "lora_pet_config.yaml").is_file()       # lora_alpha 16 travels beside the .ckpt

    b = load_backend("mindspore", str(tmp_path / "base" / "tiny.ckpt"), str(TOKENIZER_MODEL),
                     adapter=str(tmp_path / "lora.ckpt"))
    assert b.model_id == "lora.ckpt"
    from mindspore_glm.checkpointing import load_weights
    from mindspore_glm.lora import apply_lora, lora_layers
    from mindspore_glm.model import ChatGLM2ForConditionalGeneration
    assert not lora_layers(b.model) or all(c.lora_merged for c in lora_layers(b.model).values())
    ref = ChatGLM2ForConditionalGeneration.from_pretrained(str(TINY_MODEL))
    plain = ref.chat(b.tokenizer, QUERY, max_new_tokens=n, do_sample=False)[0]
    apply_lora(ref, r=4, lora_alpha=16, lora_dropout=0.0, target_modules="query_key_value")
    loaded = load_weights(ref, str(tmp_path / "lora.ckpt"), strict=False)
    assert loaded and all("mindpet_delta_lora" in name for name in loaded)
    ref.set_train(False)
    want = ref.chat(b.tokenizer, QUERY, max_new_tokens=n, do_sample=False)[0]
    assert want != plain                                        # the adapter changes the answer
    # the independent implementation: peft's own model answers the same
    assert want == peft_model.chat(b.tokenizer, QUERY, max_new_tokens=n, do_sample=False)[0]
    assert _served_answer(b, n) == want


@pytest.mark.slow
def test_mindspore_prefix_adapter(tmp_path):
    """A P-tuning v2 prefix as a MindSpore ``.ckpt`` (``convert/adapters.py prefix-to-ms``) over its base
    model answers as the torch P-tuning model's own greedy ``chat()``."""
    import json

    from safetensors.numpy import load_file, save_file

    from tests.conftest import TINY_PTUNING_MODEL
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    n = 12
    weights = load_file(str(TINY_PTUNING_MODEL / "model.safetensors"))
    base = tmp_path / "base"                      # the P-tuning model's base: its weights, no prefix
    base.mkdir()
    save_file({k: v for k, v in weights.items() if "prefix_encoder" not in k}, str(base / "model.safetensors"))
    config = json.loads((TINY_PTUNING_MODEL / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "pre_seq_len": None}))
    subprocess.run([sys.executable, "convert/adapters.py", "prefix-to-ms", "--hf", str(TINY_PTUNING_MODEL),
                    "--output", str(tmp_path / "prefix.ckpt")], check=True, capture_output=True, cwd=str(ROOT))
    b = load_backend("mindspore", str(base), str(TOKENIZER_MODEL), adapter=str(tmp_path / "prefix.ckpt"))
    assert b.model.pre_seq_len == config["pre_seq_len"]
    ref = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_PTUNING_MODEL).eval()
    want = ref.chat(b.tokenizer, QUERY, max_new_tokens=n, do_sample=False)[0]
    plain = ChatGLM2ForConditionalGeneration.from_pretrained(base).chat(b.tokenizer, QUERY, max_new_tokens=n,
                                                                       do_sample=False)[0]
    assert want != plain                          # the prefix changes the answer
    assert _served_answer(b, n) == want


def test_mindspore_bad_adapter_is_one_line(tmp_path):
    """A ``.ckpt`` without LoRA/prefix weights, or a LoRA ``.ckpt`` whose pet_config lacks ``lora_alpha``:
    a :class:`~glm_serve.backends.BackendError` naming the file (before any model is built)."""
    import numpy as np

    from convert.ms_ckpt import save_ms_checkpoint
    from glm_serve.backends import BackendError
    (tmp_path / "config.json").write_bytes((TINY_MODEL / "config.json").read_bytes())
    base = save_ms_checkpoint([("transformer.output_layer.weight", np.zeros((2, 2), np.float32))],
                              tmp_path / "base.ckpt")          # never loaded: the adapter is refused first
    save_ms_checkpoint([("transformer.output_layer.weight", np.zeros((2, 2), np.float32))], tmp_path / "w.ckpt")
    with pytest.raises(BackendError, match=r"w\.ckpt: --adapter: holds no LoRA or prefix weights"):
        load_backend("mindspore", base, str(TOKENIZER_MODEL), adapter=str(tmp_path / "w.ckpt"))
    save_ms_checkpoint([("transformer.encoder.layers.0.self_attention.query_key_value.mindpet_delta_lora_a",
                         np.zeros((4, 8), np.float32))], tmp_path / "lora.ckpt")
    (tmp_path / "lora_pet_config.yaml").write_text("pet_config:\n  pet_type: lora\n  lora_rank: 4\n")
    with pytest.raises(BackendError, match=r"lora_pet_config\.yaml: pet_config\.lora_alpha: missing"):
        load_backend("mindspore", base, str(TOKENIZER_MODEL), adapter=str(tmp_path / "lora.ckpt"))


def test_torch_lora_adapter_that_does_not_fit_is_one_line(tmp_path):
    """A LoRA target the model lacks is refused (as ``adapters.py merge`` refuses it), not dropped; a B of
    the wrong shape is one line naming the module, not a ``load_state_dict`` traceback."""
    from safetensors.numpy import load_file, save_file

    from glm_serve.backends import BackendError
    _peft_adapter(tmp_path / "adapter")
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    qkv = "base_model.model.transformer.encoder.layers.{}.self_attention.query_key_value.lora_{}.weight"
    save_file({**weights, qkv.format(7, "A"): weights[qkv.format(0, "A")], qkv.format(7, "B"): weights[qkv.format(0, "B")]},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(BackendError, match=r"adapter: transformer\.encoder\.layers\.7\.self_attention\.query_key_value: "
                                           r"LoRA target has no weight in the model"):
        load_backend("torch", str(TINY_MODEL), str(TOKENIZER_MODEL), adapter=str(tmp_path / "adapter"))
    save_file({**weights, qkv.format(0, "B"): weights[qkv.format(0, "B")][:100]},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    out = subprocess.run([sys.executable, "-m", "glm_serve", "--backend", "torch", "--model", str(TINY_MODEL),
                          "--tokenizer", str(TOKENIZER_MODEL), "--adapter", str(tmp_path / "adapter"), "--port", "0"],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "http://" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"glm2-serve: {tmp_path / 'adapter'}: transformer.encoder.layers.0.self_attention.query_key_value: lora A "
        f"[4, 64] / B [100, 4] do not fit the model's weight [128, 64] (B @ A must be [out, in])")


def test_mindspore_lora_adapter_that_does_not_fit_is_one_line(tmp_path, tmp_path_factory):
    """The twin of the torch refusal, for a MindSpore LoRA ``.ckpt``."""
    import numpy as np

    from convert.ms_ckpt import save_ms_checkpoint
    from glm_serve.backends import BackendError
    from tests.serve.conftest import ms_checkpoint
    base = ms_checkpoint(tmp_path_factory)
    qkv = "transformer.encoder.layers.{}.self_attention.query_key_value.mindpet_delta_lora_{}"
    a, b = np.zeros((4, 64), np.float32), np.zeros((128, 4), np.float32)
    save_ms_checkpoint([(qkv.format(0, "a"), a), (qkv.format(0, "b"), b), (qkv.format(7, "a"), a),
                        (qkv.format(7, "b"), b)], tmp_path / "lora.ckpt")
    with pytest.raises(BackendError, match=r"lora\.ckpt: transformer\.encoder\.layers\.7\.self_attention\."
                                           r"query_key_value: LoRA target has no weight in the model"):
        load_backend("mindspore", base, str(TOKENIZER_MODEL), adapter=str(tmp_path / "lora.ckpt"))
    save_ms_checkpoint([(qkv.format(0, "a"), a), (qkv.format(0, "b"), b[:100])], tmp_path / "lora.ckpt")
    with pytest.raises(BackendError, match=r"query_key_value: lora A \[4, 64\] / B \[100, 4\] do not fit the "
                                           r"model's weight \[128, 64\]"):
        load_backend("mindspore", base, str(TOKENIZER_MODEL), adapter=str(tmp_path / "lora.ckpt"))
