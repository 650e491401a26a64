"""Weight-only int8/int4 serving on torch: each quantized linear computes with the weight its integers and
scales define (within half a step of the float weight), the model stays close to float32 on the golden
tiny model, the linears shrink, and the server answers as the quantized model's own ``chat()``."""
import subprocess
import sys

import pytest
import torch

from glm_serve.backends import BackendError, load_backend
from tests.conftest import ROOT, TINY_MODEL, TOKENIZER_MODEL
from tests.serve.conftest import serving
from tests.serve.test_api import _client


@pytest.mark.parametrize("bits,levels", [(8, 127), (4, 7)])
def test_weight_only_linear(bits, levels):
    from torch_glm.quantize import INT4_GROUP, WeightOnlyLinear
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = WeightOnlyLinear(linear, bits)
    w, deq = linear.weight.detach(), q.dequantized()
    group = 64 if bits == 8 else INT4_GROUP
    absmax = w.view(48, -1, group).abs().amax(2, keepdim=True).expand(-1, -1, group).reshape(48, 64)
    step = absmax / levels                                   # the quantization step of each weight
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()        # round to nearest
    assert torch.equal(torch.round(deq / step), torch.round(w / step).clamp(-levels - (bits == 4), levels))
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, deq, linear.bias), rtol=1e-5, atol=1e-5)
    assert q.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.qweight.numel() == (64 * 48 if bits == 8 else 64 * 48 // 2)


def _bytes(module):
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("bits,max_err,min_agree", [(8, 0.1, 0.95), (4, 1.0, 0.6)])
def test_quantized_model_close_to_float32(bits, max_err, min_agree):
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    from torch_glm.quantize import quantize
    ref = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL).eval()
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL).eval()
    layers_before = _bytes(model.transformer.encoder.layers)
    assert quantize(model, bits) == 4 * len(model.transformer.encoder.layers)
    ids = torch.tensor([list(range(5, 60))])
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits, model(input_ids=ids).logits
    assert float((got - want).abs().max() / want.std()) < max_err
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= min_agree
    ratio = _bytes(model.transformer.encoder.layers) / layers_before
    assert ratio < (0.3 if bits == 8 else 0.2)


def test_served_int8_answers_as_its_model(tmp_path):
    b = load_backend("torch", str(TINY_MODEL), str(TOKENIZER_MODEL), quantize=8)
    want = b.solo_answer("讲个笑话", [], 12)
    with serving(b) as (url, _):
        r = _client(url).chat.completions.create(model=b.model_id, messages=[{"role": "user", "content": "讲个笑话"}],
                                                 max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want
    with pytest.raises(BackendError, match="--quantize 8: weight-only quantization is 8 or 4 bits, on the torch"):
        load_backend("mindspore", str(TINY_MODEL), str(TOKENIZER_MODEL), quantize=8)
    out = subprocess.run([sys.executable, "-m", "glm_serve", "--backend", "torch", "--model", str(TINY_MODEL),
                          "--quantize", "3"], capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--quantize" in out.stderr
