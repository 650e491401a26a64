"""Loading a model, its tokenizer and its batch decoder for either backend (imported only here).

``torch``: an HF ChatGLM2 directory (:class:`torch_glm.model.ChatGLM2ForConditionalGeneration`), with an
optional adapter: a peft LoRA directory (merged into the weights for serving) or a P-tuning result
(``prefix_encoder.safetensors``); dtype float32/float16/bfloat16; device cpu/cuda[:N].
``mindspore``: our or mindformers' ``.ckpt`` (``config.json`` beside it) or an HF directory
(:class:`mindspore_glm.model.ChatGLM2ForConditionalGeneration`), with an optional adapter ``.ckpt``
holding only LoRA or prefix weights (LoRA: rank read from its shapes, ``lora_alpha`` given or read from
the ``<name>_pet_config.yaml`` that ``convert/adapters.py peft-to-ms`` writes beside it; merged into the
weights on load, as torch's); device CPU/Ascend.
``quantize`` (torch only): 8 or 4 for weight-only int8/int4 transformer-layer linears
(:mod:`torch_glm.quantize`, ChatGLM2's ``quantize(bits)``), after any adapter is merged.
The tokenizer (``tokenizer.model``) is looked up beside the model when not given.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Backend", "BackendError", "load_backend", "find_tokenizer", "BACKENDS"]

BACKENDS = ("torch", "mindspore")


class BackendError(ValueError):
    """A model, tokenizer or adapter that cannot be loaded; one line naming the path."""


@dataclass
class Backend:
    name: str
    model: Any
    tokenizer: Any
    decoder_cls: Any
    settings_cls: Any
    seq_length: int
    model_id: str

    def decoder(self, max_batch: int, prefix_cache: int = 0):
        return self.decoder_cls(self.model, max_batch, prefix_cache)

    def solo_answer(self, query: str, history, max_new_tokens: int) -> str:
        """The model's own greedy ``chat()`` answer (what a request must get from the server)."""
        return self.model.chat(self.tokenizer, query, history, max_new_tokens=max_new_tokens, do_sample=False)[0]


def find_tokenizer(model: str, tokenizer: Optional[str]) -> str:
    if tokenizer:
        if not os.path.isfile(tokenizer):
            raise BackendError(f"{tokenizer}: --tokenizer: no such file (a sentencepiece tokenizer.model)")
        return tokenizer
    folder = model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model))
    for name in ("tokenizer.model", "ice_text.model"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise BackendError(f"{model}: no tokenizer.model beside the model; give --tokenizer PATH")


def load_backend(backend: str, model: str, tokenizer: Optional[str] = None, adapter: Optional[str] = None,
                 dtype: Optional[str] = None, device: Optional[str] = None,
                 lora_alpha: Optional[float] = None, quantize: Optional[int] = None) -> Backend:
    """Load everything a server or chat needs; raises :class:`BackendError` (one line) for bad input."""
    if backend not in BACKENDS:
        raise BackendError(f"--backend: {backend!r}; expected one of {', '.join(BACKENDS)}")
    if not os.path.exists(model):
        raise BackendError(f"{model}: --model: no such file or directory")
    if adapter and not os.path.exists(adapter):
        raise BackendError(f"{adapter}: --adapter: no such file or directory")
    if quantize is not None and (backend != "torch" or quantize not in (8, 4)):
        raise BackendError(f"--quantize {quantize}: weight-only quantization is 8 or 4 bits, on the torch backend")
    from glm_common.tokenizer import ChatGLM2Tokenizer
    tok = ChatGLM2Tokenizer(find_tokenizer(model, tokenizer))
    model_id = os.path.basename(os.path.normpath(adapter or model))
    if backend == "torch":
        return _load_torch(model, tok, adapter, dtype, device, model_id, quantize)
    return _load_mindspore(model, tok, adapter, dtype, device, model_id, lora_alpha)


def _load_torch(path, tok, adapter, dtype, device, model_id, quantize=None) -> Backend:
    from glm_common.config import ChatGLM2Config
    if not os.path.isdir(path):
        raise BackendError(f"{path}: --backend torch needs an HF model directory (config.json and weights)")
    config = ChatGLM2Config.from_hf(path)
    prefix = None
    if adapter:
        prefix = adapter if adapter.endswith(".safetensors") else os.path.join(adapter, "prefix_encoder.safetensors")
        if os.path.isfile(prefix):
            from safetensors import safe_open
            with safe_open(prefix, "np") as f:
                names = list(f.keys())
                table = [n for n in names if n.endswith("embedding.weight")]
                if not table:
                    raise BackendError(f"{prefix}: no prefix_encoder.embedding.weight")
                rows = f.get_slice(table[0]).get_shape()[0]
            config = config.replace(pre_seq_len=int(rows), prefix_projection=any(".trans." in n for n in names))
        elif not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise BackendError(f"{adapter}: --adapter: neither a peft LoRA directory (adapter_config.json) nor a "
                               f"P-tuning result (prefix_encoder.safetensors)")
        else:
            prefix = None
    from torch_glm.engine import BatchDecoder, SamplingSettings        # torch only once the input checked out
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    try:
        model = ChatGLM2ForConditionalGeneration.from_pretrained(path, torch_dtype=dtype or "float32",
                                                                 device=device or "cpu", config=config)
        if prefix:
            from torch_glm.prefix import load_prefix
            load_prefix(model, prefix)
        elif adapter:
            from torch_glm.lora import load_lora, merge_lora
            _check_lora_targets(adapter, _peft_pairs(adapter), dict(model.named_parameters()), path)
            model = merge_lora(load_lora(model, adapter))
    except (OSError, ValueError) as e:
        raise BackendError(str(e).splitlines()[0]) from None
    if quantize:
        from torch_glm.quantize import quantize as quantize_weights
        quantize_weights(model, quantize)
    model.eval()
    return Backend("torch", model, tok, BatchDecoder, SamplingSettings, config.seq_length, model_id)


def _load_mindspore(path, tok, adapter, dtype, device, model_id, lora_alpha) -> Backend:
    import mindspore as ms
    from glm_common.config import ChatGLM2Config
    target = {"cpu": "CPU", "ascend": "Ascend", "npu": "Ascend"}.get((device or "cpu").split(":")[0].lower())
    if target is None:
        raise BackendError(f"--device: {device!r}; the mindspore backend runs on cpu or ascend[:N]")
    kw = dict(mode=ms.PYNATIVE_MODE, device_target=target)
    if target == "Ascend" and device and ":" in device:
        kw["device_id"] = int(device.split(":")[1])
    ms.set_context(**kw)
    from mindspore_glm.engine import BatchDecoder, SamplingSettings
    from mindspore_glm.model import ChatGLM2ForConditionalGeneration
    dtypes = {}
    if dtype and dtype != "float32":
        dtypes = dict(param_init_type=dtype, compute_dtype=dtype)
    try:
        config = None
        if adapter:
            from convert.ms_ckpt import MSCheckpoint
            ck = MSCheckpoint(adapter)
            base = ChatGLM2Config.from_hf(path if os.path.isdir(path) else
                                          os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"))
            table = [n for n in ck.names if n.endswith("prefixtuning_embedding.embedding_table")]
            lora = [n for n in ck.names if n.endswith("mindpet_delta_lora_a")]
            if table:
                config = base.replace(pre_seq_len=int(ck.info(table[0])[0][0]),
                                      prefix_projection=any("dense_in" in n for n in ck.names))
            elif not lora:
                raise BackendError(f"{adapter}: --adapter: holds no LoRA or prefix weights")
            elif lora_alpha is None:
                lora_alpha = _pet_lora_alpha(adapter)
        model = ChatGLM2ForConditionalGeneration.from_pretrained(path, config=config, **dtypes)
        if adapter:
            from mindspore_glm.checkpointing import load_weights
            if lora:
                from mindspore_glm.lora import apply_lora, merge_lora
                layers = sorted({n[:-len(".mindpet_delta_lora_a")] for n in lora})
                rank = int(ck.info(lora[0])[0][0])
                pairs = {m: (ck.info(m + ".mindpet_delta_lora_a")[0], ck.info(m + ".mindpet_delta_lora_b")[0])
                         for m in layers if m + ".mindpet_delta_lora_b" in ck.names}
                if len(pairs) < len(layers):
                    lone = sorted(set(layers) - set(pairs))[0]
                    raise BackendError(f"{adapter}: {lone}: has mindpet_delta_lora_a only (A and B go together)")
                _check_lora_targets(adapter, pairs, {p.name: p for p in model.get_parameters()}, path)
                apply_lora(model, r=rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=layers)
            load_weights(model, adapter, strict=False)
            if lora:
                merge_lora(model)
    except BackendError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise BackendError(str(e).splitlines()[0]) from None
    model.set_train(False)
    return Backend("mindspore", model, tok, BatchDecoder, SamplingSettings, model.config.seq_length, model_id)


def _peft_pairs(adapter: str) -> dict:
    """``{module: (A shape, B shape)}`` of a peft LoRA directory (read and checked by ``convert/adapters.py``)."""
    from convert.adapters import read_peft_adapter
    lora = read_peft_adapter(adapter)                       # ConversionError: one line naming the file
    return {m: (a.shape, b.shape) for m, (a, b) in lora.pairs.items()}


def _check_lora_targets(adapter: str, pairs: dict, weights: dict, model: str) -> None:
    """Every LoRA target is a linear weight of the model and ``B @ A`` has its shape (as ``adapters.py merge``
    refuses otherwise); ``pairs``: ``{module: (A shape, B shape)}``, ``weights``: the model's by name."""
    for module, (a, b) in sorted(pairs.items()):
        w = weights.get(module + ".weight")
        if w is None:
            raise BackendError(f"{adapter}: {module}: LoRA target has no weight in the model {model}")
        want, got = tuple(w.shape), (tuple(b)[0], tuple(a)[-1])
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or want != got:
            raise BackendError(f"{adapter}: {module}: lora A {list(a)} / B {list(b)} do not fit the model's "
                               f"weight {list(want)} (B @ A must be [out, in])")


def _pet_lora_alpha(adapter: str) -> float:
    """``lora_alpha`` of a MindSpore LoRA ``.ckpt``: from the ``<name>_pet_config.yaml`` beside it (what
    ``convert/adapters.py peft-to-ms`` writes), else mindformers' default 32."""
    pet = os.path.splitext(adapter)[0] + "_pet_config.yaml"
    if not os.path.isfile(pet):
        return 32.0
    from convert.adapters import read_pet_config
    try:
        return float(read_pet_config(pet)["lora_alpha"])
    except (KeyError, TypeError, ValueError):              # ConversionError is a ValueError
        raise BackendError(f"{pet}: pet_config.lora_alpha: missing or not a number (or give --lora-alpha)") from None
