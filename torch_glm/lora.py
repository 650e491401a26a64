"""Parameter-efficient fine-tuning: LoRA (peft), P-tuning v2 (prefix, base frozen) and QLoRA (peft + 4-bit NF4).

LoRA adapters are standard peft adapter directories (``adapter_config.json``,
``adapter_model.safetensors``) with HF parameter names, so ``peft.PeftModel.from_pretrained`` loads
them onto this model or any other ChatGLM2 with HF names. ``pet_config`` mappings are read by the one
strict :func:`glm_common.run_config.pet_settings` (mindformers keys: ``pet_type: lora|ptuning2|qlora``,
``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``target_modules``; ``pre_seq_len``,
``prefix_projection``, ``dropout_prob``). The LoRA layer is peft's (a wrapper model); mindspore_glm
keeps mindpet's matrices inside its own Linear cell, hence the divergent helpers of the two files.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from glm_common.run_config import RunConfigError
from torch_glm.prefix import freeze_base

__all__ = ["DEFAULT_TARGET_MODULES", "lora_config", "apply_lora", "save_lora", "load_lora", "merge_lora",
           "apply_ptuning", "apply_pet", "quantize_4bit", "apply_qlora"]

#: the linear layers LoRA wraps by default (ChatGLM2's fused q/k/v projection).
DEFAULT_TARGET_MODULES = ("query_key_value",)


def lora_config(r: int = 8, lora_alpha: float = 32, lora_dropout: float = 0.1,
                target_modules: Union[str, Sequence[str], None] = None, inference_mode: bool = False):
    """A ``peft.LoraConfig`` for causal LM; ``target_modules`` is a list of module-name suffixes or one regex."""
    from peft import LoraConfig, TaskType
    targets = target_modules if target_modules is not None else list(DEFAULT_TARGET_MODULES)
    if not isinstance(targets, str):
        targets = list(targets)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=int(r), lora_alpha=lora_alpha, lora_dropout=float(lora_dropout),
                      target_modules=targets, inference_mode=inference_mode)


def apply_lora(model: nn.Module, r: int = 8, lora_alpha: float = 32, lora_dropout: float = 0.1,
               target_modules: Union[str, Sequence[str], None] = None):
    """Wrap ``model`` in a peft LoRA model (base frozen, ``lora_B`` zero: the output is unchanged at start).
    The LoRA matrices take the base weights' dtype, as mindpet's do in MindSpore (peft's
    ``autocast_adapter_dtype`` off): a float16 model trains them through the optimizer's float32 masters."""
    from peft import get_peft_model
    return get_peft_model(model, lora_config(r, lora_alpha, lora_dropout, target_modules),
                          autocast_adapter_dtype=False)


def save_lora(peft_model, save_directory: Union[str, os.PathLike]) -> str:
    """Write the adapter directory (``adapter_config.json``, ``adapter_model.safetensors``); return it."""
    save_directory = os.fspath(save_directory)
    peft_model.save_pretrained(save_directory, safe_serialization=True)
    return save_directory


def load_lora(model: nn.Module, adapter_dir: Union[str, os.PathLike], is_trainable: bool = False):
    """Load a peft adapter directory onto ``model`` (ours or any with HF names)."""
    adapter_dir = os.fspath(adapter_dir)
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a peft adapter directory)")
    from convert._cli import KNOWN_ERRORS
    from convert.adapters import read_peft_adapter, validate_lora
    config = getattr(getattr(model, "base_model", model), "config", None) or getattr(model, "config", None)
    try:  # alpha, targets, layers, shapes and values checked as the converters check them
        validate_lora(read_peft_adapter(adapter_dir), config if hasattr(config, "num_layers") else None,
                      f"{getattr(model, 'name_or_path', 'the model')}")
    except KNOWN_ERRORS as e:
        raise RunConfigError(str(e)) from None
    from peft import PeftModel
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)


def merge_lora(model) -> nn.Module:
    """Fold ``W += (alpha / r) * B @ A`` into the base weights of the peft ``model``; return the plain base model."""
    return model.merge_and_unload()


def apply_ptuning(model: nn.Module) -> nn.Module:
    """P-tuning v2: freeze everything but ``transformer.prefix_encoder`` (the model needs ``pre_seq_len``)."""
    if getattr(model.config, "pre_seq_len", None) is None:
        raise RunConfigError("pre_seq_len: P-tuning v2 needs a model built with pre_seq_len set "
                             "(ChatGLM2ForConditionalGeneration.from_pretrained(dir, config=config.replace(pre_seq_len=N)))")
    freeze_base(model)
    return model


def apply_pet(model: nn.Module, pet: Mapping[str, Any], seed: Optional[int] = None) -> tuple:
    """Make what ``pet`` (:func:`glm_common.run_config.pet_settings`) names trainable: LoRA or QLoRA (peft
    wrapper), P-tuning v2 (the prefix encoder, its dropout ``dropout_prob``) or, for ``full``, everything.
    ``seed`` reseeds torch's RNG before the LoRA matrices are drawn (None: the current RNG).
    Returns ``(model, trainable parameters)``: the model is the peft wrapper for (Q)LoRA.
    """
    kind = pet["pet_type"]
    if seed is not None:
        torch.manual_seed(seed)
    if kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif kind == "lora":
        model = apply_lora(model, pet["r"], pet["lora_alpha"], pet["lora_dropout"], pet["target_modules"])
    elif kind == "ptuning2":
        model = apply_ptuning(model)
        model.transformer.prefix_dropout.p = float(pet.get("dropout_prob", 0.1))
    elif kind == "qlora":
        model = apply_qlora(model, pet["r"], pet["lora_alpha"], pet["lora_dropout"], pet["target_modules"])
    else:
        raise RunConfigError(f"pet_config.pet_type: unknown {kind!r}")
    return model, [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------- QLoRA
def _require_qlora():
    if not torch.cuda.is_available():
        raise RuntimeError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels); none is available")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError("QLoRA needs bitsandbytes: pip install 'glm2-ascend[cuda]' (bitsandbytes>=0.43)") from None


def quantize_4bit(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                  skip: Sequence[str] = ("output_layer",)) -> nn.Module:
    """Replace the encoder's ``nn.Linear`` layers by bitsandbytes NF4 ``Linear4bit`` on CUDA (in place).

    Weights ``[out, in]`` are quantized to 4-bit NF4 with double quantization; matmuls run in
    ``compute_dtype``. Layers whose name ends with one of ``skip`` stay as they are.
    """
    _require_qlora()
    import bitsandbytes as bnb
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".encoder." in f".{name}." and not name.endswith(tuple(skip))]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to(torch.float16).cpu(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, child, q.cuda())
    model.cuda()
    return model


def apply_qlora(model: nn.Module, r: int = 8, lora_alpha: float = 32, lora_dropout: float = 0.1,
                target_modules: Union[str, Sequence[str], None] = None, compute_dtype: torch.dtype = torch.bfloat16):
    """QLoRA: 4-bit NF4 base (:func:`quantize_4bit`), frozen, with LoRA adapters in ``compute_dtype``."""
    _require_qlora()
    from peft import get_peft_model
    from peft.utils.other import prepare_model_for_kbit_training
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(compute_dtype)
    quantize_4bit(model, compute_dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(r, lora_alpha, lora_dropout, target_modules))
