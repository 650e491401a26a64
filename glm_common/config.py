"""The ChatGLM2 architecture as one dataclass, read from and written to the formats users have.

Sources:
- an HF ``config.json`` (or the directory holding it): :meth:`ChatGLM2Config.from_hf`, written back by
  :meth:`ChatGLM2Config.save_hf` with every key it was read with;
- a mindformers-shaped YAML ``model.model_config`` mapping: :meth:`ChatGLM2Config.from_model_config`,
  which returns the architecture and, apart from it, the run options (:class:`RunOptions`: compute
  dtypes, ``use_past``, generation defaults) that mindformers keeps in the same mapping;
- named presets: :func:`preset` (``glm2_6b``, ``tiny``).

Every field is type-checked; a bad or missing field raises :class:`ConfigError` whose message is one
line naming the file and the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

__all__ = ["ConfigError", "ChatGLM2Config", "RunOptions", "preset", "PRESETS", "DTYPES"]

#: dtype names accepted wherever a dtype is configured.
DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line: ``source: field: what is wrong``."""


# Fields whose absence would make the shapes a guess: they must be present in every source.
REQUIRED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
            "padded_vocab_size")


@dataclass
class ChatGLM2Config:
    """ChatGLM2 architecture (docs/architecture.md, section 1). Defaults are the HF ChatGLMConfig's defaults
    for optional switches; dimension fields (``REQUIRED``) have no default in a file."""

    num_layers: int = 28
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    num_attention_heads: int = 32
    kv_channels: int = 128
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    padded_vocab_size: int = 65024
    seq_length: int = 2048
    layernorm_epsilon: float = 1e-5
    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    rmsnorm: bool = True
    post_layer_norm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    pre_seq_len: Optional[int] = None
    prefix_projection: bool = False
    original_rope: bool = True
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "float16"
    # Switches HF configs carry that do not change the numerics of a float forward pass.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    fp32_residual_connection: bool = False
    bias_dropout_fusion: bool = True
    quantization_bit: int = 0
    #: keys of the source this dataclass has no field for (``architectures``, ``auto_map``, ...),
    #: kept so that writing the config back loses nothing.
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ derived sizes
    @property
    def kv_groups(self) -> int:
        """Key/value head groups ``g``: ``multi_query_group_num`` with MQA, else one per head."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def projection_size(self) -> int:
        """Width of the attention output, ``np * hn``."""
        return self.num_attention_heads * self.kv_channels

    @property
    def qkv_size(self) -> int:
        """Output width of ``query_key_value``: ``np*hn + 2*g*hn``."""
        return self.projection_size + 2 * self.kv_groups * self.kv_channels

    @property
    def prefix_kv_size(self) -> int:
        """Width of one P-tuning prefix row: ``num_layers * 2 * g * hn``."""
        return self.num_layers * 2 * self.kv_groups * self.kv_channels

    @property
    def rope_ratio(self) -> float:
        """mindformers' ``rope_ratio`` (ChatGLM2-6B-32K's position scaling): the rotary base is
        ``10000 * rope_ratio`` (mindformers' glm2 ``base = base * rope_ratio``); 1 for ChatGLM2-6B. Kept in
        :attr:`extra` so configs without it are written back as they were read."""
        return float(self.extra.get("rope_ratio", 1) or 1)

    @property
    def rope_base(self) -> float:
        """The rotary base both backends build their tables from: ``10000 * rope_ratio``."""
        return 10000.0 * self.rope_ratio

    @property
    def vocab_size(self) -> int:
        return self.padded_vocab_size

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "config") -> "ChatGLM2Config":
        """Check types and the relations between sizes; raise :class:`ConfigError` naming ``source``."""
        for f in _FIELDS.values():
            setattr(self, f.name, _coerce(getattr(self, f.name), f, source))
        for name in REQUIRED + ("multi_query_group_num", "seq_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{source}: {name}: must be a positive integer, got {getattr(self, name)}")
        if self.pre_seq_len is not None and self.pre_seq_len <= 0:
            raise ConfigError(f"{source}: pre_seq_len: must be a positive integer or null, got {self.pre_seq_len}")
        if self.multi_query_attention and self.num_attention_heads % self.multi_query_group_num:
            raise ConfigError(f"{source}: multi_query_group_num: {self.multi_query_group_num} does not divide "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.kv_channels % 4:
            raise ConfigError(f"{source}: kv_channels: must be a multiple of 4 (rotary pairs over half of "
                              f"each head), got {self.kv_channels}")
        if not self.original_rope:
            raise ConfigError(f"{source}: original_rope: only the original rotary embedding (true) is supported")
        if not self.rmsnorm:
            raise ConfigError(f"{source}: rmsnorm: only RMSNorm (true) is supported, as in every ChatGLM2 release")
        if self.apply_residual_connection_post_layernorm:
            raise ConfigError(f"{source}: apply_residual_connection_post_layernorm: only false (pre-norm "
                              "residuals) is supported, as in every ChatGLM2 release")
        if not self.post_layer_norm:
            raise ConfigError(f"{source}: post_layer_norm: only true is supported, as in every ChatGLM2 release")
        if self.quantization_bit not in (0,):
            raise ConfigError(f"{source}: quantization_bit: weights quantized in the checkpoint are not "
                              f"supported, got {self.quantization_bit} (use 0; QLoRA quantizes at load time)")
        return self

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config", require: bool = True) -> "ChatGLM2Config":
        """Build from an HF-shaped mapping; unknown keys go to :attr:`extra`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of config fields, got {type(data).__name__}")
        if require:
            for name in REQUIRED:
                if name not in data:
                    raise ConfigError(f"{source}: {name}: missing (required field)")
        known = {k: v for k, v in data.items() if k in _FIELDS}
        extra = {k: v for k, v in data.items() if k not in _FIELDS and k != "extra"}
        cfg = cls(**known)
        cfg.extra = extra
        return cfg.validate(source)

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> "ChatGLM2Config":
        """Read an HF ``config.json`` (or the directory that holds one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such file (an HF ChatGLM2 directory holds config.json)")
        try:
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        if isinstance(data, Mapping) and data.get("model_type", "chatglm") != "chatglm":
            raise ConfigError(f"{path}: model_type: expected 'chatglm', got {data.get('model_type')!r}")
        if isinstance(data, Mapping) and data.get("rope_ratio", 1) not in (1, 1.0, None):
            raise ConfigError(f"{path}: rope_ratio: {data['rope_ratio']!r}: the HF ChatGLM2-6B-32K code divides "
                              "positions by it, mindformers multiplies the rotary base; only mindformers' reading "
                              "(a model_config key of a run YAML) is implemented")
        return cls.from_dict(data, source=path)

    def to_hf_dict(self) -> dict:
        """The HF ``config.json`` content: extra keys first (as read), then every field."""
        out = {"model_type": "chatglm", "architectures": ["ChatGLMModel"]}
        out.update(self.extra)
        for f in _FIELDS.values():
            out[f.name] = getattr(self, f.name)
        out.setdefault("tie_word_embeddings", False)
        out.setdefault("use_cache", True)
        return dict(sorted(out.items()))

    def save_hf(self, path: str | os.PathLike) -> str:
        """Write ``config.json`` (into ``path`` if it is a directory) atomically; return the file path."""
        path = os.fspath(path)
        if os.path.isdir(path) or not path.endswith(".json"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, "config.json")
        from glm_common.fsutil import atomic_write_text
        return atomic_write_text(path, json.dumps(self.to_hf_dict(), indent=2, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------ mindformers YAML
    @classmethod
    def from_model_config(cls, mapping: Mapping[str, Any], source: str = "model.model_config"
                          ) -> tuple["ChatGLM2Config", "RunOptions"]:
        """Split a mindformers ``model.model_config`` mapping into architecture and run options.

        ``type`` is ignored; keys known to be mindformers run switches without meaning here
        (``checkpoint_name_or_path``, ``parallel_config``...) are returned in ``RunOptions.ignored``
        so the caller can list them once in a warning; any other unknown key is an error.
        """
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{source}: expected a mapping, got {type(mapping).__name__}")
        arch, run, ignored = {}, {}, {}
        for key, value in mapping.items():
            value = _yaml_scalar(value)
            if key == "type":
                continue
            if key == "pet_config":
                run["pet_config"] = value
                continue
            if key in _FIELDS or key == "rope_ratio":      # rope_ratio: kept in extra (see ChatGLM2Config.rope_ratio)
                arch[key] = value
            elif key in _RUN_FIELDS:
                run[key] = value
            elif key in MINDFORMERS_IGNORED:
                ignored[key] = value
            else:
                raise ConfigError(f"{source}.{key}: unknown model_config key"
                                  + did_you_mean(key, list(_FIELDS) + list(_RUN_FIELDS) + sorted(MINDFORMERS_IGNORED)
                                                 + ["pet_config", "rope_ratio", "type"]))
        if "rope_ratio" in arch:
            ratio = arch["rope_ratio"]
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
                raise ConfigError(f"{source}.rope_ratio: expected a positive number, got {ratio!r}")
        # the dtype weights are stored in: mindformers calls it param_init_type
        arch.setdefault("torch_dtype", run.get("param_init_type", RunOptions.param_init_type))
        cfg = cls.from_dict(arch, source=source)
        opts = RunOptions(**run)
        opts.ignored = ignored
        return cfg, opts.validate(source)

    def to_model_config(self, options: Optional["RunOptions"] = None) -> dict:
        """A mindformers-shaped ``model_config`` mapping (architecture plus run options)."""
        out = {"type": "ChatGLM2Config"}
        out.update({f.name: getattr(self, f.name) for f in _FIELDS.values() if f.name != "torch_dtype"})
        opts = options or RunOptions()
        out.update({f.name: getattr(opts, f.name) for f in dataclasses.fields(RunOptions) if f.name != "ignored"})
        return out

    def replace(self, **changes) -> "ChatGLM2Config":
        new = dataclasses.replace(self, **changes)
        new.extra = dict(self.extra)
        return new.validate("replace()")


@dataclass
class RunOptions:
    """Run options that mindformers keeps in ``model_config`` beside the architecture."""

    batch_size: int = 1
    param_init_type: str = "float16"
    compute_dtype: str = "float16"
    layernorm_compute_type: str = "float32"
    softmax_compute_type: str = "float32"
    rotary_dtype: Optional[str] = None
    use_past: bool = False
    use_flash_attention: bool = False
    qkv_concat: bool = True
    mlp_concat: bool = True
    max_decode_length: int = 512
    repetition_penalty: float = 1.0
    top_k: int = 1
    top_p: float = 1.0
    do_sample: bool = False
    #: the ``pet_config`` mapping (``pet_type: lora|ptuning2`` and its options), as read; the runner checks it.
    pet_config: Optional[dict] = None
    #: mindformers keys that mean nothing for this stack, as read (for a one-time warning).
    ignored: dict = field(default_factory=dict, repr=False, compare=False)

    def validate(self, source: str = "model_config") -> "RunOptions":
        for f in dataclasses.fields(self):
            if f.name == "ignored":
                continue
            setattr(self, f.name, _coerce(getattr(self, f.name), f, source))
        for name in ("param_init_type", "compute_dtype", "layernorm_compute_type", "softmax_compute_type",
                     "rotary_dtype"):
            value = getattr(self, name)
            if value is None and name == "rotary_dtype":
                continue
            if value not in DTYPES:
                raise ConfigError(f"{source}.{name}: expected one of {', '.join(DTYPES)}, got {value!r}")
        if self.batch_size <= 0:
            raise ConfigError(f"{source}.batch_size: must be a positive integer, got {self.batch_size}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{source}.top_p: must be in (0, 1], got {self.top_p}")
        return self


def did_you_mean(key: str, known) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to ``key`` (``difflib``), or ``""``."""
    import difflib
    near = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


# mindformers ChatGLM2Config keys that exist for its Ascend kernels, weight download or pipeline
# bookkeeping; they are accepted and reported, never silently used.
MINDFORMERS_IGNORED = frozenset({
    "checkpoint_name_or_path", "parallel_config", "offset", "pp_interleave_num", "is_dynamic",
    "block_size", "num_blocks", "use_rearrange_rope", "mask_generate", "fine_grain_interleave",
    "use_ring_attention", "post_self_attn_layernorm", "post_mlp_layernorm", "gmask_token_id",
    "bos_token_id", "vocab_size", "classifier_dropout", "max_length", "use_cache",
    "tie_word_embeddings", "architectures", "model_type", "auto_map", "transformers_version",
    "interleaved_qkv", "no_recompute_layers", "seq_parallel", "use_prompt_flash_attention",
    "use_incre_flash_attention", "quant_config", "moe_config", "lora_config",
    "residual_dtype", "enable_high_performance",
})

_FIELDS = {f.name: f for f in dataclasses.fields(ChatGLM2Config) if f.name != "extra"}
_RUN_FIELDS = {f.name: f for f in dataclasses.fields(RunOptions) if f.name != "ignored"}

_TYPE_NAMES = {"int": int, "bool": bool, "float": float, "str": str, "Optional[int]": (int, type(None)),
               "Optional[str]": (str, type(None)), "Optional[dict]": (dict, type(None))}


def _yaml_scalar(value):
    """YAML 1.1 reads ``1e-5`` and ``None`` as strings; mindformers configs use both."""
    if isinstance(value, str):
        if value in ("None", "none", "null", "~"):
            return None
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def _coerce(value, f: dataclasses.Field, source: str):
    """Check ``value`` against the field's annotation; accept ints for floats; return the value."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kind = kind.replace("typing.", "")
    expected = _TYPE_NAMES.get(kind)
    if expected is None:
        return value
    if isinstance(value, str) and kind in ("float",):
        value = _yaml_scalar(value)
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in ("int", "Optional[int]") and isinstance(value, float) and value.is_integer():
        return int(value)
    ok = isinstance(value, expected)
    if isinstance(value, bool) and kind != "bool":
        ok = False
    if not ok:
        want = {"int": "an integer", "bool": "true or false", "float": "a number", "str": "a string",
                "Optional[int]": "an integer or null", "Optional[str]": "a string or null",
                "Optional[dict]": "a mapping or null"}[kind]
        raise ConfigError(f"{source}: {f.name}: expected {want}, got {value!r} ({type(value).__name__})")
    return value


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, dict] = {
    # ChatGLM2-6B as released (HF config.json of THUDM/chatglm2-6b).
    "glm2_6b": dict(num_layers=28, hidden_size=4096, ffn_hidden_size=13696, num_attention_heads=32,
                    kv_channels=128, multi_query_attention=True, multi_query_group_num=2,
                    padded_vocab_size=65024, seq_length=32768, layernorm_epsilon=1e-5, add_qkv_bias=True,
                    add_bias_linear=False, torch_dtype="float16"),
    # The golden tiny model (../shared/golden/model/tiny_glm2/config.json).
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, kv_channels=16,
                 multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=3072, seq_length=256,
                 layernorm_epsilon=1e-5, add_qkv_bias=True, add_bias_linear=False, torch_dtype="float32"),
}


def preset(name: str, **overrides) -> ChatGLM2Config:
    """A named configuration (``glm2_6b``, ``tiny``), optionally with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown name {name!r}; known: {', '.join(sorted(PRESETS))}")
    data = dict(PRESETS[name], **overrides)
    return ChatGLM2Config.from_dict(data, source=f"preset {name}")
