"""Parameter names: the one place that knows HF, mindformers and LoRA (peft / mindpet) naming.

HF (``transformer.embedding.word_embeddings.weight`` ...) is the canonical form. mindformers renames
the embedding (``embedding_weight``; ``embedding_table`` in older releases), may split
``query_key_value`` into ``wq/wk/wv`` (``qkv_concat: False``) and ``dense_h_to_4h`` into
``dense_left/dense_right`` (``mlp_concat: False``), and names the P-tuning v2 prefix after mindpet.
LoRA matrices are ``<linear>.lora_A.weight`` / ``<linear>.lora_B.weight`` in peft and
``<linear>.mindpet_delta_lora_a`` / ``<linear>.mindpet_delta_lora_b`` in mindpet (same shapes:
A ``[r, in]``, B ``[out, r]``).
"""
from __future__ import annotations

import re
from typing import Optional

from glm_common.config import ChatGLM2Config

__all__ = [
    "NamingError", "HF_EMBEDDING", "MS_EMBEDDING", "MS_EMBEDDING_LEGACY", "NAMINGS", "hf_param_shapes",
    "hf_to_ms", "ms_to_hf", "is_derived_buffer", "layer_index", "PEFT_PREFIX", "peft_to_mindpet",
    "mindpet_to_peft", "lora_base_name", "is_lora_name", "split_qkv_names", "split_mlp_names",
    "HF_PREFIX_EMBEDDING", "MS_PREFIX_EMBEDDING", "HF_TO_MS_PREFIX", "MS_TO_HF_PREFIX",
]


class NamingError(ValueError):
    """A parameter name that fits no known scheme."""


HF_EMBEDDING = "transformer.embedding.word_embeddings.weight"
MS_EMBEDDING = "transformer.embedding.embedding_weight"
MS_EMBEDDING_LEGACY = "transformer.embedding.embedding_table"
#: ``naming`` values accepted by converters: MindSpore embedding name of each.
NAMINGS = {"mindformers": MS_EMBEDDING, "legacy": MS_EMBEDDING_LEGACY}

# P-tuning v2 prefix encoder: HF (ChatGLM2 PrefixEncoder) vs mindformers' mindpet PrefixEncoder.
HF_PREFIX_EMBEDDING = "transformer.prefix_encoder.embedding.weight"
MS_PREFIX_EMBEDDING = "prefix_encoder.mindpet_delta_prefixtuning_embedding.embedding_table"
HF_TO_MS_PREFIX = {
    HF_PREFIX_EMBEDDING: MS_PREFIX_EMBEDDING,
    "transformer.prefix_encoder.trans.0.weight": "prefix_encoder.mindpet_delta_prefixtuning_dense_in.weight",
    "transformer.prefix_encoder.trans.0.bias": "prefix_encoder.mindpet_delta_prefixtuning_dense_in.bias",
    "transformer.prefix_encoder.trans.2.weight": "prefix_encoder.mindpet_delta_prefixtuning_dense_out.weight",
    "transformer.prefix_encoder.trans.2.bias": "prefix_encoder.mindpet_delta_prefixtuning_dense_out.bias",
}
MS_TO_HF_PREFIX = {v: k for k, v in HF_TO_MS_PREFIX.items()}

_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.")


def hf_param_shapes(config: ChatGLM2Config, include_prefix: bool = True) -> dict[str, tuple[int, ...]]:
    """Every HF parameter name of a model with ``config`` and its shape, in checkpoint order."""
    c = config
    H, V, F = c.hidden_size, c.padded_vocab_size, c.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {HF_EMBEDDING: (V, H)}
    for i in range(c.num_layers):
        p = f"transformer.encoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "self_attention.query_key_value.weight"] = (c.qkv_size, H)
        if c.add_qkv_bias:
            shapes[p + "self_attention.query_key_value.bias"] = (c.qkv_size,)
        shapes[p + "self_attention.dense.weight"] = (H, c.projection_size)
        if c.add_bias_linear:
            shapes[p + "self_attention.dense.bias"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        shapes[p + "mlp.dense_h_to_4h.weight"] = (2 * F, H)
        if c.add_bias_linear:
            shapes[p + "mlp.dense_h_to_4h.bias"] = (2 * F,)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (H, F)
        if c.add_bias_linear:
            shapes[p + "mlp.dense_4h_to_h.bias"] = (H,)
    shapes["transformer.encoder.final_layernorm.weight"] = (H,)
    shapes["transformer.output_layer.weight"] = (V, H)
    if include_prefix and c.pre_seq_len is not None:
        kv = c.prefix_kv_size
        shapes[HF_PREFIX_EMBEDDING] = (c.pre_seq_len, kv)
        if c.prefix_projection:
            # ChatGLM2's PrefixEncoder: Embedding(pre_seq_len, kv) -> Linear(kv, H) -> tanh -> Linear(H, kv)
            shapes["transformer.prefix_encoder.trans.0.weight"] = (H, kv)
            shapes["transformer.prefix_encoder.trans.0.bias"] = (H,)
            shapes["transformer.prefix_encoder.trans.2.weight"] = (kv, H)
            shapes["transformer.prefix_encoder.trans.2.bias"] = (kv,)
    return shapes


def is_derived_buffer(name: str) -> bool:
    """Names found in some checkpoints that are derived, not weights (rotary ``inv_freq``, kv caches)."""
    return (name.endswith("rotary_pos_emb.inv_freq") or ".paged_attention_mgr." in name
            or name.endswith(("key_cache", "value_cache")) or name.endswith("mindpet_delta_prefixtuning_prefix"))


def layer_index(name: str) -> Optional[int]:
    """Layer number of a per-layer parameter name, else ``None``."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def hf_to_ms(name: str, naming: str = "mindformers") -> str:
    """HF name -> MindSpore (mindformers) name. LoRA and prefix names are mapped too."""
    if naming not in NAMINGS:
        raise NamingError(f"naming: expected one of {', '.join(NAMINGS)}, got {naming!r}")
    if name == HF_EMBEDDING:
        return NAMINGS[naming]
    if name in HF_TO_MS_PREFIX:
        return HF_TO_MS_PREFIX[name]
    if is_lora_name(name):
        return peft_to_mindpet(name)
    return name


def ms_to_hf(name: str) -> str:
    """MindSpore (mindformers, current or legacy) name -> HF name."""
    if name in (MS_EMBEDDING, MS_EMBEDDING_LEGACY):
        return HF_EMBEDDING
    if name in MS_TO_HF_PREFIX:
        return MS_TO_HF_PREFIX[name]
    if "mindpet_delta_lora_" in name:
        return mindpet_to_peft(name, prefix="")
    return name


# ---------------------------------------------------------------------- split layouts
def split_qkv_names(qkv_name: str) -> tuple[str, str, str]:
    """``...query_key_value.weight`` -> the ``wq/wk/wv`` names of ``qkv_concat: False``."""
    if ".query_key_value." not in qkv_name:
        raise NamingError(f"{qkv_name}: not a query_key_value parameter")
    return tuple(qkv_name.replace(".query_key_value.", f".{w}.") for w in ("wq", "wk", "wv"))


def split_mlp_names(h_to_4h_name: str) -> tuple[str, str]:
    """``...mlp.dense_h_to_4h.weight`` -> the ``dense_left/dense_right`` names of ``mlp_concat: False``."""
    if ".dense_h_to_4h." not in h_to_4h_name:
        raise NamingError(f"{h_to_4h_name}: not a dense_h_to_4h parameter")
    return tuple(h_to_4h_name.replace(".dense_h_to_4h.", f".{w}.") for w in ("dense_left", "dense_right"))


# ---------------------------------------------------------------------- LoRA
#: prefix peft puts before the base model's names in an adapter file.
PEFT_PREFIX = "base_model.model."
_PEFT_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<base>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_MINDPET_LORA = re.compile(r"^(?P<base>.+)\.mindpet_delta_lora_(?P<ab>[abAB])$")


def is_lora_name(name: str) -> bool:
    return bool(_PEFT_LORA.match(name) or _MINDPET_LORA.match(name))


def lora_base_name(name: str) -> tuple[str, str]:
    """``(linear module name without adapter prefix, "A" or "B")`` of a peft or mindpet LoRA name."""
    m = _PEFT_LORA.match(name) or _MINDPET_LORA.match(name)
    if not m:
        raise NamingError(f"{name}: not a LoRA parameter name (peft lora_A/lora_B or mindpet_delta_lora_a/b)")
    return m.group("base"), m.group("ab").upper()


def peft_to_mindpet(name: str) -> str:
    """``base_model.model.X.lora_A[.default].weight`` -> ``X.mindpet_delta_lora_a``."""
    m = _PEFT_LORA.match(name)
    if not m:
        raise NamingError(f"{name}: not a peft LoRA parameter name")
    base = m.group("base")
    if base == "transformer.embedding.word_embeddings":
        base = MS_EMBEDDING.rsplit(".", 1)[0]
    return f"{base}.mindpet_delta_lora_{m.group('ab').lower()}"


def mindpet_to_peft(name: str, prefix: str = PEFT_PREFIX, adapter: Optional[str] = None) -> str:
    """``X.mindpet_delta_lora_a`` -> ``base_model.model.X.lora_A.weight`` (the adapter-file key).

    ``adapter`` inserts the adapter name (``lora_A.default.weight``) as in a live peft model's
    ``state_dict``; ``prefix=""`` drops ``base_model.model.``.
    """
    m = _MINDPET_LORA.match(name)
    if not m:
        raise NamingError(f"{name}: not a mindpet LoRA parameter name")
    mid = f".{adapter}" if adapter else ""
    return f"{prefix}{m.group('base')}.lora_{m.group('ab').upper()}{mid}.weight"


# ---------------------------------------------------------------------- training state
#: prefixes of the optimizer / gradient-accumulation tensors a training checkpoint holds beside the
#: weights (MindSpore's AdamWeightDecay ``adam_m.X``/``adam_v.X``, mindformers' ``moment1.X``/``accu_grads.X``,
#: the parallel optimizer's ``accum.X``; the float32 ``master_weights.X`` of a weight kept in float16).
TRAIN_STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "moments.", "accu_grads.",
                        "accumulated_grads.", "accum.", "master_weights.")
#: scalars optimizers, loss scaling and the training loop save next to the weights (ours:
#: ``global_step``, ``epoch_num``, ``step_num``, ``loss_scale``, ``loss_scale_good_steps``, and the run's
#: ``world_size`` / ``rank_id`` that the merger checks its ranks against; mindformers / MindSpore's
#: ``scale_sense``, ``current_iterator_step``, ``last_overflow_iterator_step`` ...).
TRAIN_STATE_SCALARS = ("global_step", "epoch_num", "step_num", "loss_scale", "loss_scale_good_steps",
                       "scale_sense", "current_iterator_step", "last_overflow_iterator_step", "learning_rate",
                       "beta1_power", "beta2_power", "world_size", "rank_id")


def is_train_state(name: str) -> bool:
    """Whether ``name`` is optimizer or training-loop state rather than a model weight."""
    return name in TRAIN_STATE_SCALARS or name.startswith(TRAIN_STATE_PREFIXES)


__all__ += ["TRAIN_STATE_PREFIXES", "TRAIN_STATE_SCALARS", "is_train_state"]


# ---------------------------------------------------------------------- P-tuning prefix, PET
#: module path of the P-tuning v2 prefix encoder: HF's (torch_glm) and mindformers' (mindspore_glm)
PREFIX_MODULE = "transformer.prefix_encoder"
MS_PREFIX_MODULE = "prefix_encoder"
#: the marker mindpet puts in the names of the parameters it adds (LoRA and prefix)
MINDPET_MARKER = "mindpet_delta"


def is_prefix_name(name: str) -> bool:
    """Whether ``name`` is a P-tuning v2 prefix-encoder parameter (HF or mindformers naming)."""
    return name.startswith((PREFIX_MODULE + ".", MS_PREFIX_MODULE + "."))


def is_pet_name(name: str) -> bool:
    """Whether ``name`` is a parameter parameter-efficient fine-tuning adds (LoRA matrix or prefix)."""
    return is_lora_name(name) or is_prefix_name(name) or MINDPET_MARKER in name


__all__ += ["PREFIX_MODULE", "MS_PREFIX_MODULE", "MINDPET_MARKER", "is_prefix_name", "is_pet_name"]

#: the names mindpet gives a LoRA layer's two matrices (``<linear>.mindpet_delta_lora_a`` / ``_b``)
MINDPET_LORA_A, MINDPET_LORA_B = MINDPET_MARKER + "_lora_a", MINDPET_MARKER + "_lora_b"

__all__ += ["MINDPET_LORA_A", "MINDPET_LORA_B"]

#: the optimizer-moment prefixes MindSpore's AdamWeightDecay gives its state (``adam_m.<param>``, ``adam_v.<param>``)
MS_ADAM_MOMENTS = ("adam_m.", "adam_v.")
assert set(MS_ADAM_MOMENTS) <= set(TRAIN_STATE_PREFIXES)

__all__ += ["MS_ADAM_MOMENTS"]


def pet_weights_missing(pet_type: str, adapter_names, sources) -> "str | None":
    """Why an eval/predict run with ``pet_type`` (lora, ptuning2) cannot use checkpoints ``sources`` that
    hold the adapter weights ``adapter_names`` (None when some are there): an adapter left at its
    initial value (LoRA B = 0) would report the base model's numbers under the fine-tune's name."""
    if pet_type not in ("lora", "ptuning2") or list(adapter_names):
        return None
    what = "LoRA (lora_a/lora_b)" if pet_type == "lora" else "P-tuning v2 prefix (prefix_encoder)"
    where = " + ".join(str(s) for s in sources) or "no checkpoint"
    return (f"pet_type {pet_type} needs its {what} weights, but {where} holds none; load the fine-tuned "
            f"checkpoint (--load_checkpoint RUN/checkpoint/rank_0/...ckpt) or remove pet_config")
__all__ += ["pet_weights_missing"]
