"""ChatGLM2 in PyTorch: the whole model in one file, with HF parameter names.

Modules (each docstring states tensor shapes): :class:`RMSNorm`, the rotary helpers
:func:`build_rope_cache` / :func:`apply_rope`, :class:`SelfAttention` (multi-query, through
``torch.nn.functional.scaled_dot_product_attention``), :class:`MLP` (SwiGLU), :class:`GLMBlock`,
:class:`ChatGLM2Model` (embedding, encoder, output layer, optional P-tuning prefix) and
:class:`ChatGLM2ForConditionalGeneration` (loss, loading and saving the HF layouts, generation via
:class:`torch_glm.generate.GenerationMixin`).

Numerics follow docs/architecture.md (section 3). Key/value caches are per layer ``(key, value)`` pairs of shape
``[B, g, S_past, hn]`` (rotary already applied; P-tuning prefix entries first when present).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from convert.hf_layout import CheckpointError, HFCheckpoint, numpy_to_torch, torch_to_numpy, write_hf_checkpoint
from convert.tensor_checks import check_tensor
from glm_common.config import ChatGLM2Config
from glm_common.names import hf_param_shapes, is_derived_buffer, is_prefix_name
from torch_glm.generate import GenerationMixin
from torch_glm.prefix import PrefixEncoder

__all__ = ["WeightError", "ModelConfig", "RMSNorm", "Embedding", "build_rope_cache", "apply_rope",
           "build_attention_mask", "SelfAttention", "MLP", "GLMBlock", "GLMTransformer", "ChatGLM2Model",
           "ChatGLM2ForConditionalGeneration", "causal_lm_loss", "DTYPES"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

KVCache = Sequence[tuple[torch.Tensor, torch.Tensor]]


class ModelConfig(ChatGLM2Config):
    """:class:`ChatGLM2Config` with the two attributes transformers/peft read from a model's config
    (``model_type`` and ``to_dict()``, the HF ``config.json`` content)."""

    model_type = "chatglm"

    def to_dict(self) -> dict:
        return self.to_hf_dict()

    @classmethod
    def from_pretrained(cls, path, **unused) -> "ModelConfig":
        return cls.wrap(ChatGLM2Config.from_hf(path))

    @classmethod
    def wrap(cls, config: ChatGLM2Config) -> "ModelConfig":
        if isinstance(config, cls):
            return config
        out = cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(ChatGLM2Config) if f.name != "extra"})
        out.extra = dict(config.extra)
        return out


class WeightError(CheckpointError):
    """A checkpoint that cannot be loaded into the model; one line naming the file and parameter."""


# ---------------------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    """``x [..., H] -> [..., H]``: ``weight * x * rsqrt(mean(float32(x)^2) + eps)`` cast back to ``x``'s dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(variance + self.eps)
        return (self.weight * y).to(x.dtype)


class Embedding(nn.Module):
    """``input_ids [B, S] -> [B, S, H]`` (HF name ``embedding.word_embeddings``)."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


def build_rope_cache(seq_len: int, kv_channels: int, base: float = 10000.0) -> torch.Tensor:
    """Float32 ``[seq_len, kv_channels // 4, 2]`` table of ``(cos, sin)`` of ``pos * base^(-2i/rot)``,
    ``rot = kv_channels // 2`` (the rotated first half of each head), computed on the CPU."""
    rot_dim = kv_channels // 2
    theta = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    pos = torch.arange(seq_len, dtype=torch.float32)
    angles = torch.outer(pos, theta).float()
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the first ``2 * rope.shape[-2]`` dims of each head.

    ``x``: ``[B, heads, S, hn]``; ``rope``: ``[B, S, rot/2, 2]`` (cos, sin) in ``x``'s dtype.
    Returns ``[B, heads, S, hn]``; dims past ``rot`` pass through.
    """
    rot = rope.shape[-2] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    xs = x_rot.reshape(*x_rot.shape[:-1], rot // 2, 2)
    r = rope.unsqueeze(1)  # [B, 1, S, rot/2, 2]
    cos, sin = r[..., 0], r[..., 1]
    x0, x1 = xs[..., 0], xs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([out, x_pass], dim=-1)


def build_attention_mask(attention_mask: Optional[torch.Tensor], q_len: int, past_len: int) -> torch.Tensor:
    """Boolean ``[B, 1, q_len, past_len + q_len]`` mask (True = may attend); ``[1, 1, q_len, past_len + q_len]``
    (plain causal) when ``attention_mask`` is None.

    ``attention_mask``: ``[B, past_len + q_len]`` of 1 (token) / 0 (padding) over every key column (a
    P-tuning prefix counts as past, its columns 1). Query ``i`` sees key ``j`` when ``j <= past_len + i``
    and key ``j`` is not padding. Without a past, padding queries see every key (their outputs are never
    used); any row left empty sees every key.
    """
    k_len = past_len + q_len
    device = attention_mask.device if attention_mask is not None else None
    causal = torch.arange(k_len, device=device)[None, :] <= (torch.arange(q_len, device=device)[:, None] + past_len)
    allowed = causal[None]
    if attention_mask is not None:
        pad = attention_mask.to(torch.bool)
        allowed = allowed & pad[:, None, :]
        if past_len == 0:
            allowed = allowed | ~pad[:, :, None]
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def _sdpa_mask(attention_mask: Optional[torch.Tensor], q_len: int, past_len: int) -> Optional[torch.Tensor]:
    """:func:`build_attention_mask`, or None where SDPA's plain causal (no past) or full attention (a
    single query over a cache) is exact; :class:`SelfAttention` passes ``is_causal`` accordingly."""
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None and (past_len == 0 or q_len == 1):
        return None
    return build_attention_mask(attention_mask, q_len, past_len)


class SelfAttention(nn.Module):
    """``x [B, S, H] -> [B, S, H]`` with rotary positions and multi-query key/value groups.

    ``query_key_value`` gives ``[q | k | v]`` of widths ``np*hn, g*hn, g*hn`` (multi-query) or, without
    multi-query attention, a per-head interleaved ``[np, 3*hn]``. Query head ``h`` reads group
    ``h // (np / g)``. ``past``: ``(key, value)`` each ``[B, g, S_past, hn]``.
    """

    def __init__(self, config: ChatGLM2Config, layer_number: int = 0):
        super().__init__()
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.groups = config.kv_groups
        self.multi_query = config.multi_query_attention
        self.query_key_value = nn.Linear(config.hidden_size, config.qkv_size, bias=config.add_qkv_bias)
        self.dense = nn.Linear(config.projection_size, config.hidden_size, bias=config.add_bias_linear)
        self.attention_dropout = config.attention_dropout     # on the probabilities, training only

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor],
                past: Optional[tuple[torch.Tensor, torch.Tensor]] = None, use_cache: bool = False):
        """``rope [B, S, rot/2, 2]``; ``mask`` from :func:`build_attention_mask`. Returns ``(y, present)``."""
        B, S, _ = x.shape
        nh, hn, g = self.num_heads, self.head_dim, self.groups
        qkv = self.query_key_value(x)
        if self.multi_query:
            q, k, v = qkv.split([nh * hn, g * hn, g * hn], dim=-1)
            q = q.view(B, S, nh, hn)
            k = k.view(B, S, g, hn)
            v = v.view(B, S, g, hn)
        else:
            q, k, v = qkv.view(B, S, nh, 3 * hn).split(hn, dim=-1)
        q = apply_rope(q.transpose(1, 2), rope)
        k = apply_rope(k.transpose(1, 2), rope)
        v = v.transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        present = (k, v) if use_cache else None
        if g != nh:
            k = k.repeat_interleave(nh // g, dim=1)
            v = v.repeat_interleave(nh // g, dim=1)
        is_causal = mask is None and k.shape[2] == S and S > 1
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             dropout_p=self.attention_dropout if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(B, S, nh * hn)
        return self.dense(ctx), present


class MLP(nn.Module):
    """SwiGLU: ``x [B, S, H] -> [B, S, H]``; ``dense_h_to_4h`` gives ``[a | b]`` (``2F``), then ``silu(a) * b``."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(a) * b)


class GLMBlock(nn.Module):
    """Pre-norm block: ``x = x + Attn(RMSNorm(x))``; ``x = x + MLP(RMSNorm(x))``; ``[B, S, H] -> [B, S, H]``."""

    def __init__(self, config: ChatGLM2Config, layer_number: int = 0):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, layer_number)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, past=None, use_cache: bool = False):
        attn, present = self.self_attention(self.input_layernorm(x), rope, mask, past, use_cache)
        x = x + F.dropout(attn, p=self.hidden_dropout, training=self.training)
        x = x + F.dropout(self.mlp(self.post_attention_layernorm(x)), p=self.hidden_dropout, training=self.training)
        return x, present


class GLMTransformer(nn.Module):
    """The layer stack and the final RMSNorm (HF name ``encoder``)."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config, i + 1) for i in range(config.num_layers)])
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.gradient_checkpointing = False

    def forward(self, x, rope, mask, past_key_values: Optional[KVCache] = None, use_cache: bool = False):
        """``x [B, S, H]`` -> ``(hidden [B, S, H], presents or None)``."""
        presents = [] if use_cache else None
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, present = checkpoint(layer, x, rope, mask, past, use_cache, use_reentrant=False)
            else:
                x, present = layer(x, rope, mask, past, use_cache)
            if use_cache:
                presents.append(present)
        return self.final_layernorm(x), (tuple(presents) if use_cache else None)


class ChatGLM2Model(nn.Module):
    """Embedding, encoder, output layer and (with ``pre_seq_len``) the P-tuning prefix encoder.

    ``forward(input_ids [B, S], ...) -> (hidden [B, S, H], presents)``; ``output_layer`` maps the
    hidden states to logits (applied by :class:`ChatGLM2ForConditionalGeneration`).
    """

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.pre_seq_len = config.pre_seq_len
        if config.pre_seq_len is not None:
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(0.1)   # pet_config.dropout_prob (lora.apply_pet)
        self._rope_table: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ rotary table
    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``position_ids [B, S]`` -> ``[B, S, hn/4, 2]``: float32 table rows rounded to ``dtype``."""
        need = int(position_ids.max()) + 1 if position_ids.numel() else 1
        table = self._rope_table
        if table is None or table.shape[0] < need or table.device != position_ids.device:
            length = max(need, self.config.seq_length, 0 if table is None else table.shape[0])
            table = build_rope_cache(length, self.config.kv_channels, self.config.rope_base).to(position_ids.device)
            self._rope_table = table
        return table[position_ids].to(dtype)

    # ------------------------------------------------------------------ prefix
    def get_prompt(self, batch_size: int, device, dtype) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The prefix as a per-layer past: ``num_layers`` pairs of ``[B, g, pre_seq_len, hn]``."""
        c = self.config
        tokens = torch.arange(c.pre_seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
        kv = self.prefix_encoder(tokens).to(dtype)
        kv = kv.view(batch_size, c.pre_seq_len, c.num_layers * 2, c.kv_groups, c.kv_channels)
        kv = self.prefix_dropout(kv)
        kv = kv.permute(2, 0, 3, 1, 4)  # [L*2, B, g, P, hn]
        return tuple((kv[2 * i], kv[2 * i + 1]) for i in range(c.num_layers))

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, use_cache: bool = False):
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("input_ids: one of input_ids or inputs_embeds is required")
            inputs_embeds = self.embedding(input_ids)
        B, S, _ = inputs_embeds.shape
        device, dtype = inputs_embeds.device, inputs_embeds.dtype
        P = self.pre_seq_len or 0
        if past_key_values is not None and len(past_key_values) == 0:
            past_key_values = None
        if past_key_values is None and P:
            past_key_values = self.get_prompt(B, device, dtype)
        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        own_past = past_len - P  # cached tokens of the sequence itself (prefix excluded)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
                raise ValueError(f"attention_mask: expected [B={B}, past+S], got {list(attention_mask.shape)}")
            if P and attention_mask.shape[1] == own_past + S:
                attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
            if attention_mask.shape[1] != past_len + S:
                raise ValueError(f"attention_mask: expected {own_past + S} columns (cached + new tokens), "
                                 f"got {attention_mask.shape[1]}")
        if position_ids is None:
            position_ids = torch.arange(own_past, own_past + S, device=device).unsqueeze(0).expand(B, -1)
        rope = self.rope(position_ids, dtype)
        mask = _sdpa_mask(attention_mask, S, past_len)
        return self.encoder(inputs_embeds, rope, mask, past_key_values, use_cache)


# ---------------------------------------------------------------------------------------- top model
class ChatGLM2ForConditionalGeneration(GenerationMixin, nn.Module):
    """ChatGLM2 with the language-model loss; parameter names are HF's (``transformer.…``).

    ``forward(input_ids [B, S], attention_mask [B, past+S], position_ids [B, S], labels [B, S],
    past_key_values, use_cache)`` returns ``.logits [B, S, V]``, ``.loss`` (float32 scalar when
    ``labels``) and ``.past_key_values`` (per layer ``(key, value)`` ``[B, g, S_total, hn]``).
    """

    main_input_name = "input_ids"
    generation_config = None  # read and written back by peft's generate()
    supports_gradient_checkpointing = True

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.config = config = ModelConfig.wrap(config)
        self.transformer = ChatGLM2Model(config)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                past_key_values: Optional[KVCache] = None, use_cache: Optional[bool] = None,
                inputs_embeds: Optional[torch.Tensor] = None, return_last_logit: bool = False,
                **unused) -> CausalLMOutputWithPast:
        use_cache = bool(use_cache) if use_cache is not None else False
        hidden, presents = self.transformer(input_ids, attention_mask, position_ids, past_key_values,
                                            inputs_embeds, use_cache)
        if return_last_logit:
            hidden = hidden[:, -1:]
        logits = self.transformer.output_layer(hidden)
        loss = None
        if labels is not None:
            loss = self.loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=presents)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:func:`causal_lm_loss`."""
        return causal_lm_loss(logits, labels)

    def get_prompt(self, batch_size: int):
        """The P-tuning prefix as a per-layer past: ``num_layers`` pairs ``(key, value)`` each
        ``[B, g, P, hn]`` (in the model's dtype), or None without ``pre_seq_len``."""
        if not self.config.pre_seq_len:
            return None
        return self.transformer.get_prompt(batch_size, self.device, self.dtype)

    # ------------------------------------------------------------------ switches
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.transformer.encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.transformer.encoder.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.transformer.encoder.gradient_checkpointing

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.embedding.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.embedding.word_embeddings.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def enable_input_require_grads(self):
        """Make the embedding output require grad (for checkpointing with a frozen embedding)."""
        self.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, hf_dir: str | os.PathLike, torch_dtype=None, device=None,
                        config: Optional[ChatGLM2Config] = None, strict: bool = True,
                        **unused) -> "ChatGLM2ForConditionalGeneration":
        """Load an HF ChatGLM2 directory: ``config.json`` and ``model.safetensors``, sharded safetensors
        (``model.safetensors.index.json``) or sharded ``.bin`` (``pytorch_model.bin.index.json``).

        ``torch_dtype``: a torch dtype, ``"float32"|"float16"|"bfloat16"``, ``"auto"`` (config's
        ``torch_dtype``) or None (float32). ``config`` overrides ``config.json`` (e.g. to add
        ``pre_seq_len``; prefix weights missing from the checkpoint then keep their initialisation).
        ``strict``: unknown and missing names are errors (missing prefix weights never are).
        """
        hf_dir = os.fspath(hf_dir)
        if not os.path.isdir(hf_dir):
            raise WeightError(f"{hf_dir}: not a directory (an HF ChatGLM2 directory holds config.json and weights)")
        config = config or ChatGLM2Config.from_hf(hf_dir)
        dtype = _resolve_dtype(torch_dtype, config)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("meta"):
                model = cls(config)
        finally:
            torch.set_default_dtype(previous)
        model.to_empty(device=device or "cpu")
        params = dict(model.named_parameters())
        expected = hf_param_shapes(config)
        loaded = set()
        from tqdm.auto import tqdm
        try:
            ckpt = HFCheckpoint(hf_dir)
            for name, array in tqdm(ckpt.items(), desc="loading", unit="tensor", total=len(ckpt.names),
                                    disable=len(ckpt.shards) < 2):
                if is_derived_buffer(name):
                    continue
                source = ckpt.file_of(name)
                if name not in expected or name not in params:
                    if strict:
                        raise WeightError(f"{source}: {name}: unknown parameter for this config")
                    continue
                if tuple(array.shape) != expected[name]:
                    raise WeightError(f"{source}: {name}: shape {list(array.shape)}, expected {list(expected[name])}")
                check_tensor(name, array, source)
                with torch.no_grad():
                    params[name].copy_(numpy_to_torch(array))  # one tensor at a time
                loaded.add(name)
        except CheckpointError as e:
            if isinstance(e, WeightError):
                raise
            raise WeightError(str(e)) from None
        missing = [n for n in expected if n not in loaded]
        prefix_missing = [n for n in missing if is_prefix_name(n)]
        missing = [n for n in missing if n not in prefix_missing]
        if missing:
            raise WeightError(f"{hf_dir}: {missing[0]}: missing from the checkpoint"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if prefix_missing:
            with torch.no_grad():
                _init_module(model.transformer.prefix_encoder)
        model.eval()
        model.name_or_path = hf_dir
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size=None,
                        safe_serialization: bool = True, state_dict: Optional[dict] = None, **unused) -> list[str]:
        """Write ``config.json`` and the weights in the HF layout; returns the weight files written.

        ``max_shard_size``: bytes (int) or ``"2GB"``/``"500MB"``; None writes one file. Sharded output
        comes with ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``.
        """
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        cfg = self.config.replace(torch_dtype=_dtype_name(self.dtype))
        files = write_hf_checkpoint(((k, torch_to_numpy(v)) for k, v in state.items() if not is_derived_buffer(k)),
                                    save_directory, fmt="safetensors" if safe_serialization else "bin",
                                    max_shard_size=max_shard_size)
        files = [f for f in files if not f.endswith(".json")]
        cfg.save_hf(save_directory)
        return files


# ---------------------------------------------------------------------------------------- loss
def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logits [B, S, V]``, ``labels [B, S]`` -> mean float32 cross-entropy of ``logits[:, :-1]`` vs
    ``labels[:, 1:]``, ignoring -100."""
    shift_logits = logits[:, :-1].to(torch.float32)
    shift_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100)


# ---------------------------------------------------------------------------------------- checkpoint I/O
def _resolve_dtype(torch_dtype, config: ChatGLM2Config) -> torch.dtype:
    if torch_dtype is None:
        return torch.float32
    if torch_dtype == "auto":
        torch_dtype = config.torch_dtype
    if isinstance(torch_dtype, torch.dtype):
        if torch_dtype not in DTYPES.values():
            raise ValueError(f"torch_dtype: expected float32, float16 or bfloat16, got {torch_dtype}")
        return torch_dtype
    name = str(torch_dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"torch_dtype: expected one of {', '.join(DTYPES)} or 'auto', got {torch_dtype!r}")
    return DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _init_module(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Embedding, nn.Linear)):
            m.reset_parameters()
