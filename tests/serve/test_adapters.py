"""Serving a fine-tuned adapter: a peft LoRA directory (torch) is merged on load and answers as the
unmerged peft model's own greedy ``chat()``."""
import torch

from glm_serve.backends import load_backend
from tests.conftest import TINY_MODEL, TOKENIZER_MODEL
from tests.serve.conftest import serving
from tests.serve.test_api import _client


def test_torch_lora_adapter(tmp_path):
    from torch_glm.lora import apply_lora, save_lora
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    base = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
    peft_model = apply_lora(base, r=4, lora_alpha=16, lora_dropout=0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)                  # a trained-looking adapter (B starts at zero)
    save_lora(peft_model, tmp_path / "adapter")
    peft_model.eval()
    b = load_backend("torch", str(TINY_MODEL), str(TOKENIZER_MODEL), adapter=str(tmp_path / "adapter"))
    want = peft_model.chat(b.tokenizer, "类型#裙*颜色#蓝色", max_new_tokens=16, do_sample=False)[0]
    plain = b.model.__class__.from_pretrained(TINY_MODEL).chat(b.tokenizer, "类型#裙*颜色#蓝色", max_new_tokens=16,
                                                              do_sample=False)[0]
    assert want != plain                          # the adapter changes the answer
    assert b.model_id == "adapter"
    with serving(b) as (url, _):
        r = _client(url).chat.completions.create(model="adapter", max_tokens=16, temperature=0,
                                                 messages=[{"role": "user", "content": "类型#裙*颜色#蓝色"}])
    assert r.choices[0].message.content == want
