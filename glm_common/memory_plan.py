"""Memory plan of a training run: the bytes each device holds, from the run YAML, before a cluster is held.

    python -m mindspore_glm.plan --config YAML [--devices N] [--device-memory 32GB] [--json]
    python -m torch_glm.plan --config YAML ...            (the same plan for torch_glm: DDP or FSDP2)

Backend-free arithmetic (numpy-free even): the model's real tensor shapes
(:func:`glm_common.names.hf_param_shapes` of the YAML's ``model_config``, plus the LoRA / prefix tensors
of ``pet_config``), the dtypes of the YAML, the batch and sequence length, and what each parallel mode
shards. Per device, for the stage of the pipeline that holds the most, it counts:

* **weights**: every parameter the device stores, in ``param_init_type``. Model parallel (``mp``) splits
  the four linear weights of each layer, the query/key/value bias and the output layer (the embedding
  too unless ``vocab_emb_dp``); pipeline parallel (``pp``) gives each stage ``(layers + 1) // pp`` layers
  and the last the rest (mindformers' rule, the runner's), the first the embedding (and prefix encoder),
  the last the final norm and output layer. Optimizer
  shard (``parallel.enable_parallel_optimizer``) splits stored weights over the ``dp`` replicas where the
  engine does so: MindSpore semi-auto parallel (``parallel_mode: 1``) and torch FSDP2 full shard.
* **gathered weights**: the whole (model-parallel-local) weights an optimizer-sharded run gathers for
  compute. MindSpore keeps the AllGather outputs from the forward to the backward unless
  ``recompute_config.parallel_optimizer_comm_recompute`` (default False, as in mindformers); FSDP2 holds
  the root module's (embedding, output layer) for the step and :data:`FSDP_UNITS_IN_FLIGHT` blocks.
* **gradients**: one per trained parameter, in its dtype; sharded over ``dp`` with the optimizer shard
  (MindSpore semi-auto: reduce-scatter; FSDP2: sharded gradients). Only trained parameters get one.
* **optimizer states**: AdamW's two moments per trained parameter, float32 whatever ``param_init_type``
  (both train steps' ``make_optimizer``); over ``dp`` with the optimizer shard where it splits the
  weights (MindSpore semi-auto, torch FSDP2); MindSpore's data-parallel mode keeps the whole moments on
  every rank.
* **master weights**: a float32 copy of each trained parameter kept in float16/bfloat16, which the
  optimizer updates and the weights are cast from (0 for float32 weights); split like the states.
* **activations**: the tensors the backward reads, enumerated per layer from ChatGLM2's forward
  (:func:`layer_activation_bytes`): norm inputs, the inputs of the linears whose weights are trained,
  query/key/value (key and value expanded to every head), the softmax output and probabilities,
  the SwiGLU input and output, LoRA's low-rank outputs; the head's logits in ``compute_dtype`` and their
  float32 log-softmax. With ``recompute_config.recompute`` only each layer's input is kept, plus one
  layer's full set while it is recomputed. Both numbers are shown; the total uses the YAML's setting.
  A pipeline stage holds ``min(micro_batch_num, pp)`` micro-batches in flight (1F1B).
* **workspace**: what lives only at the peak: the gradient of the logits (float32 plus a ``compute_dtype``
  copy) at the start of the backward; the float32 copy of the gradients the update takes (MindSpore's train
  step casts them to float32 to unscale and clip; torch's foreach AdamW makes temporaries of the same size),
  which lives after the backward, when the activations are freed, so only what it needs beyond the
  activations and the logits' gradient counts; DDP's gradient buckets (a second copy of the gradients, torch
  with several ranks and no shard), and the collective library's buffer (:data:`HCCL_BUFFER_BYTES` on
  Ascend).

On MindSpore's CPU runtime two more things live through the step (``device_target: CPU``): the output of
every op that reads a parameter (the norms' weight products, the linears' and LoRA's products, the bias
adds) is an input of the graph's final ``UpdateState`` (the side-effect order of the parameters' reads),
so it is held to the end of the step, recomputed layers included (:func:`layer_held_bytes`); and the loss's
shifted logits ``logits[:, :-1]`` are a copy in ``compute_dtype``.

What it leaves out, by choice: the framework's own code and caches (not device memory), dropout masks
(the 6B YAMLs have dropout 0), and the compiler's memory reuse (each tensor above is counted whole;
graph-mode memory planning can only lower the real number). Sizes are binary: ``30GB`` is 30 GiB, as
MindSpore reads ``max_device_memory`` and as npu-smi reports.

How the constants were chosen (none was fitted to a measurement): dtype sizes are the IEEE formats';
:data:`HCCL_BUFFER_BYTES` is HCCL's documented default ``HCCL_BUFFSIZE`` (200 MB) for a multi-device
Ascend run; :data:`FSDP_UNITS_IN_FLIGHT` is FSDP2's one block computing plus one prefetched;
:data:`GRAD_UPDATE_COPIES` and :data:`DDP_BUCKET_COPIES` are read from the train steps (one float32 copy
of the gradients; DDP's buckets are one more copy). The published 910A figures and this machine's
measurements (``bench/bench_plan.py``) are used only to test the plan.

When the plan does not fit, :func:`fixes` tries the changes a user can make in the YAML (optimizer shard,
recompute, model parallel, pipeline parallel, a smaller batch; one at a time, then two together) and
lists those that fit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from glm_common.config import ChatGLM2Config
from glm_common.names import hf_param_shapes
from glm_common.parallel_keys import layer_stages

__all__ = ["PlanError", "Layout", "MemoryPlan", "DTYPE_BYTES", "HCCL_BUFFER_BYTES", "FSDP_UNITS_IN_FLIGHT",
           "GRAD_UPDATE_COPIES", "DDP_BUCKET_COPIES", "STATE_DTYPE", "parse_size", "format_size",
           "layout_from_config",
           "plan_memory", "layer_activation_bytes", "layer_held_bytes", "fixes", "format_plan", "plan_line",
           "plan_from_file", "run_plan_line", "main"]

#: bytes of one element of each dtype the YAMLs name
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: HCCL's default communication buffer (``HCCL_BUFFSIZE``, 200 MB) of a multi-device Ascend run
HCCL_BUFFER_BYTES = 200 * 2 ** 20
#: FSDP2 blocks whose weights are gathered at once: the one computing and the one prefetched
FSDP_UNITS_IN_FLIGHT = 2
#: float32 copies of the (local) gradients the update step makes (unscale/clip/AdamW)
GRAD_UPDATE_COPIES = 1
#: extra copies of the gradients DDP keeps in its communication buckets (several ranks, no shard)
DDP_BUCKET_COPIES = 1
#: the dtype of the optimizer's moments and master weights, whatever ``param_init_type`` (both train steps)
STATE_DTYPE = "float32"
_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 2 ** 10, "kib": 2 ** 10, "m": 2 ** 20, "mb": 2 ** 20, "mib": 2 ** 20,
          "g": 2 ** 30, "gb": 2 ** 30, "gib": 2 ** 30, "t": 2 ** 40, "tb": 2 ** 40, "tib": 2 ** 40}
_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


class PlanError(ValueError):
    """A YAML or option the plan cannot be made for (the message names the file and key)."""


def parse_size(text, what: str = "size") -> int:
    """``"30GB"``, ``"32GiB"``, ``"512MB"``, ``1024`` -> bytes (binary units, as MindSpore reads them)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"{what}: expected a size like 32GB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


@dataclass
class Layout:
    """Everything the plan depends on (read from a run YAML by :func:`layout_from_config`)."""

    config: ChatGLM2Config
    method: str = "full"              # full | lora | ptuning2
    pet: dict = field(default_factory=dict)
    param_dtype: str = "float16"
    compute_dtype: str = "float16"
    layernorm_dtype: str = "float32"
    softmax_dtype: str = "float32"
    state_dtype: str = STATE_DTYPE     # the optimizer's moments and master weights
    batch_size: int = 1               # per device (a data-parallel rank's batch)
    seq_length: int = 193
    dp: int = 1
    mp: int = 1
    pp: int = 1
    micro_batch_num: int = 1
    vocab_emb_dp: bool = True
    opt_shard: bool = False
    semi_auto: bool = False           # MindSpore parallel_mode 1/2 (the optimizer shard splits weights too)
    recompute: bool = False
    comm_recompute: bool = False      # recompute_config.parallel_optimizer_comm_recompute
    backend: str = "mindspore"        # mindspore | torch
    device_target: str = "CPU"
    budget: Optional[int] = None      # bytes per device
    budget_source: str = ""
    source: str = "config"
    notes: List[str] = field(default_factory=list)

    @property
    def devices(self) -> int:
        return self.dp * self.mp * self.pp


# ---------------------------------------------------------------------------------------- tensors
def _lora_targets(pet: dict) -> List[str]:
    targets = pet.get("target_modules", "query_key_value")
    return [targets] if isinstance(targets, str) else [str(t) for t in targets]


def _is_lora_target(module: str, pet: dict) -> bool:
    for t in _lora_targets(pet):
        if module.endswith("." + t) or module == t:
            return True
        try:
            if re.search(t, module):
                return True
        except re.error:
            pass
    return False


def _params(L: Layout) -> List[dict]:
    """Every parameter: ``name, numel, layer (None: outside the layers), where ('first'|'last'|'layer'),
    mp (split by model parallel), trained``."""
    c = L.config
    shapes = hf_param_shapes(c, include_prefix=L.method == "ptuning2")
    out = []
    for name, shape in shapes.items():
        numel = math.prod(shape)
        m = re.match(r"transformer\.encoder\.layers\.(\d+)\.(.+)$", name)
        layer = int(m.group(1)) if m else None
        if layer is not None:
            where = "layer"
            mp = any(m.group(2).startswith(x + ".") for x in _LINEARS)
        elif name.startswith("transformer.embedding") or "prefix_encoder" in name:
            where, mp = "first", (not L.vocab_emb_dp and "prefix_encoder" not in name)
        else:
            where, mp = "last", name.startswith("transformer.output_layer")
        trained = L.method == "full" or (L.method == "ptuning2" and "prefix_encoder" in name)
        out.append({"name": name, "numel": numel, "layer": layer, "where": where, "mp": mp, "trained": trained})
        if L.method == "lora" and layer is not None and name.endswith(".weight") and mp \
                and _is_lora_target(name[:-len(".weight")], L.pet):
            r = int(L.pet.get("r", 8))
            out_f, in_f = shape
            for suffix, n in (("lora_a", r * in_f), ("lora_b", out_f * r)):
                out.append({"name": f"{name[:-7]}.{suffix}", "numel": n, "layer": layer, "where": "layer",
                            "mp": False, "trained": True})
    return out


def _stage_layers(L: Layout) -> List[list]:
    """The layers of each pipeline stage, as the runner places them (:func:`glm_common.parallel_keys.layer_stages`)."""
    stages = layer_stages(L.config.num_layers, L.pp)
    return [[i for i, s in enumerate(stages) if s == k] for k in range(L.pp)]


def layer_activation_bytes(L: Layout, tokens: int, lora_on: Sequence[str] = (), trained_linears: bool = True) -> int:
    """Bytes one layer keeps for its backward, for ``tokens`` tokens of one micro-batch (see the module
    docstring). ``lora_on``: the linears with LoRA; ``trained_linears``: whether the linear weights train."""
    c = L.config
    cb, lb, sb = DTYPE_BYTES[L.compute_dtype], DTYPE_BYTES[L.layernorm_dtype], DTYPE_BYTES[L.softmax_dtype]
    h, a, d, f = c.hidden_size, c.num_attention_heads, c.kv_channels, c.ffn_hidden_size
    mp = L.mp
    key_len = L.seq_length + (int(L.pet.get("pre_seq_len", 0)) if L.method == "ptuning2" else 0)
    r = int(L.pet.get("r", 8))

    def needs_input(linear):
        return trained_linears or linear in lora_on

    per_token = 0
    per_token += 2 * (h * lb + 4)                         # the two RMSNorm inputs (+ 1/rms, float32)
    per_token += h * cb if needs_input("query_key_value") else 0
    per_token += 3 * a * d * cb // mp                     # q, and k, v expanded to every head
    per_token += a * key_len * (sb + cb) // mp            # softmax output + probabilities in compute dtype
    per_token += a * d * cb // mp if needs_input("dense") else 0
    per_token += h * cb if needs_input("dense_h_to_4h") else 0
    per_token += 2 * f * cb // mp                         # SwiGLU input (both halves)
    per_token += f * cb // mp                             # silu(x1)
    per_token += f * cb // mp if needs_input("dense_4h_to_h") else 0
    per_token += len(lora_on) * r * cb                    # LoRA's low-rank outputs
    return tokens * per_token


def layer_held_bytes(L: Layout, tokens: int, lora_on: Sequence[str] = (), trained_linears: bool = True,
                     recompute: bool = False) -> int:
    """Bytes of one layer that MindSpore's CPU runtime holds to the end of the step beyond
    :func:`layer_activation_bytes` (or, with ``recompute``, beyond the layer's input): the outputs of the ops
    that read a parameter, which the graph's final ``UpdateState`` takes. They are the two norms' weight
    products, the four linears' products (with the query/key/value bias add, and LoRA's two products where
    it is on). Those the backward keeps anyway (the norms' outputs as the inputs of trained linears, the
    SwiGLU input) are not counted twice, except under recompute, where the forward's copies stay while the
    backward uses recomputed ones."""
    c = L.config
    cb, lb = DTYPE_BYTES[L.compute_dtype], DTYPE_BYTES[L.layernorm_dtype]
    h, f, mp = c.hidden_size, c.ffn_hidden_size, L.mp
    qkv = c.qkv_size // mp
    r = int(L.pet.get("r", 8))

    def kept(linear):
        return not recompute and (trained_linears or linear in lora_on)

    per_token = 0
    per_token += 0 if kept("query_key_value") else h * lb              # input_layernorm's weight product
    per_token += 0 if kept("dense_h_to_4h") else h * lb                # post_attention_layernorm's
    per_token += qkv * cb * (2 if c.add_qkv_bias else 1)              # query_key_value (+ its bias add)
    per_token += h * cb                                                # dense
    per_token += 0 if not recompute else 2 * f * cb // mp              # dense_h_to_4h (the SwiGLU input)
    per_token += h * cb                                                # dense_4h_to_h
    per_token += sum(r + (qkv if m == "query_key_value" else h) for m in lora_on) * cb   # x @ A, @ B
    return tokens * per_token


def plan_memory(L: Layout) -> dict:
    """The plan of layout ``L``: per-device bytes by kind, for the stage that holds the most."""
    c = L.config
    pb = DTYPE_BYTES[L.param_dtype]
    cb = DTYPE_BYTES[L.compute_dtype]
    sb = DTYPE_BYTES[L.state_dtype]
    torch = L.backend == "torch"
    shard_weights = L.opt_shard and (torch or L.semi_auto)
    params = _params(L)
    lora_on = sorted({p["name"].split(".")[-2] for p in params if p["name"].endswith(".lora_a")})
    micro = max(1, L.batch_size // max(1, L.micro_batch_num)) if L.pp > 1 else L.batch_size
    in_flight = min(L.micro_batch_num, L.pp) if L.pp > 1 else 1
    tokens = micro * L.seq_length
    V = c.padded_vocab_size
    cpu_graph = L.backend == "mindspore" and L.device_target == "CPU"

    stages = []
    for s, layers in enumerate(_stage_layers(L)):
        first, last = s == 0, s == L.pp - 1
        mine = [p for p in params if (p["where"] == "layer" and p["layer"] in layers)
                or (p["where"] == "first" and first) or (p["where"] == "last" and last)]
        local = [(p, p["numel"] // L.mp if p["mp"] else p["numel"]) for p in mine]
        stored = sum(n for _, n in local)
        trained = sum(n for p, n in local if p["trained"])
        block = max((sum(n for p, n in local if p["layer"] == i) for i in layers), default=0)
        root = sum(n for p, n in local if p["layer"] is None)
        b: Dict[str, int] = {}
        b["weights"] = stored * pb // (L.dp if shard_weights else 1)
        if shard_weights and L.dp > 1:
            if torch:
                b["gathered_weights"] = (root + FSDP_UNITS_IN_FLIGHT * block) * cb
            elif L.comm_recompute:
                b["gathered_weights"] = 2 * block * pb
            else:
                b["gathered_weights"] = stored * pb
        else:
            b["gathered_weights"] = 0
        shard_grads = L.opt_shard and (torch or L.semi_auto)
        b["gradients"] = trained * pb // (L.dp if shard_grads else 1)
        b["optimizer_states"] = 2 * trained * sb // (L.dp if shard_weights else 1)
        masters = L.param_dtype != L.state_dtype
        b["master_weights"] = trained * sb // (L.dp if shard_weights else 1) if masters else 0

        full_layer = layer_activation_bytes(L, tokens, lora_on, trained_linears=L.method == "full")
        n_layers = len(layers)
        act_plain = n_layers * full_layer
        act_recompute = n_layers * tokens * c.hidden_size * cb + (full_layer if n_layers else 0)
        head = 0
        if last:
            hl = DTYPE_BYTES[L.layernorm_dtype]
            head += tokens * (c.hidden_size * hl + 4)                       # final norm input
            head += tokens * c.hidden_size * cb if L.method == "full" else 0  # output layer input
            head += tokens * (V // L.mp) * (cb + 4)                         # logits + float32 log-softmax
        if cpu_graph:  # MindSpore on CPU: what the final UpdateState holds, and the loss's shifted logits
            full = L.method == "full"
            act_plain += n_layers * layer_held_bytes(L, tokens, lora_on, trained_linears=full)
            act_recompute += n_layers * layer_held_bytes(L, tokens, lora_on, trained_linears=full, recompute=True)
            head += tokens * (V // L.mp) * cb if last else 0
        act = {"without_recompute": in_flight * (act_plain + head),
               "with_recompute": in_flight * (act_recompute + head)}
        b["activations"] = act["with_recompute" if L.recompute else "without_recompute"]
        work = tokens * (V // L.mp) * (4 + cb) if last else 0  # the logits' gradient
        # the update's float32 gradient copy lives after the backward, in the memory the activations and
        # the logits' gradient held: only what it needs beyond them counts
        update = GRAD_UPDATE_COPIES * 4 * trained // (L.dp if shard_grads else 1)
        work += max(0, update - b["activations"] - work)
        if torch and L.dp > 1 and not L.opt_shard:
            work += DDP_BUCKET_COPIES * trained * pb
        if L.device_target == "Ascend" and L.devices > 1:
            work += HCCL_BUFFER_BYTES
        b["workspace"] = work
        stages.append({"stage": s, "layers": n_layers, "bytes": b, "activations": act,
                       "total": sum(b.values()), "stored_params": stored, "trained_params": trained})
    worst = max(stages, key=lambda x: x["total"])
    n_params = sum(p["numel"] for p in params)
    n_trained = sum(p["numel"] for p in params if p["trained"])
    fits = None if L.budget is None else worst["total"] <= L.budget
    return {"backend": L.backend, "method": L.method, "config": L.source,
            "model": {"layers": c.num_layers, "hidden_size": c.hidden_size, "ffn_hidden_size": c.ffn_hidden_size,
                      "vocab": V, "parameters": n_params, "trained_parameters": n_trained},
            "dtypes": {"param_init_type": L.param_dtype, "compute_dtype": L.compute_dtype,
                       "layernorm_compute_type": L.layernorm_dtype, "softmax_compute_type": L.softmax_dtype,
                       "optimizer_state": L.state_dtype},
            "batch_size": L.batch_size, "seq_length": L.seq_length,
            "layout": {"devices": L.devices, "data_parallel": L.dp, "model_parallel": L.mp, "pipeline_stage": L.pp,
                       "micro_batch_num": L.micro_batch_num, "optimizer_shard": L.opt_shard,
                       "semi_auto": L.semi_auto, "recompute": L.recompute, "vocab_emb_dp": L.vocab_emb_dp},
            "stage": worst["stage"], "per_device_bytes": dict(worst["bytes"]),
            "activations_bytes": dict(worst["activations"]), "total_bytes": int(worst["total"]),
            "stage_totals_bytes": [int(s["total"]) for s in stages],
            "budget_bytes": L.budget, "budget_source": L.budget_source, "fits": fits, "notes": list(L.notes)}


# ---------------------------------------------------------------------------------------- what would fit
def _variants(L: Layout) -> List[tuple]:
    out = []
    if L.dp > 1 and not (L.opt_shard and (L.semi_auto or L.backend == "torch")):
        change = {"opt_shard": True}
        label = "optimizer shard (parallel.enable_parallel_optimizer: True"
        if L.backend == "mindspore" and not L.semi_auto:
            change["semi_auto"] = True
            label += " with parallel.parallel_mode: 1"
        out.append((label + ")", change))
    if not L.recompute:
        out.append(("recompute (recompute_config.recompute: True)", {"recompute": True}))
    if L.backend == "mindspore":
        n = L.dp * L.mp
        for mp in (2, 4, 8):
            if mp > L.mp and n % mp == 0 and L.config.num_attention_heads % mp == 0:
                out.append((f"model parallel {mp} (parallel_config.model_parallel: {mp}, data_parallel: {n // mp})",
                            {"mp": mp, "dp": n // mp}))
                break
        n = L.dp * L.pp
        for pp in (2, 4, 8):
            if pp > L.pp and n % pp == 0 and pp <= L.config.num_layers:
                out.append((f"pipeline parallel {pp} (parallel_config.pipeline_stage: {pp}, data_parallel: "
                            f"{n // pp}, micro_batch_num: {max(pp, L.micro_batch_num)})",
                            {"pp": pp, "dp": n // pp, "micro_batch_num": max(pp, L.micro_batch_num)}))
                break
    b = L.batch_size // 2
    while b >= 1:
        out.append((f"batch size {b} (runner_config.batch_size: {b})", {"batch_size": b}))
        b //= 2
    return out


def fixes(L: Layout) -> List[dict]:
    """Changes of the YAML that make the plan fit ``L.budget``: one change at a time (the smallest batch
    that fits only), then, if none does, two together. ``[{"change", "total_bytes"}]``."""
    if L.budget is None:
        return []
    found, singles = [], _variants(L)
    batch_found = False
    for label, change in singles:
        if "batch_size" in change and batch_found:
            continue
        total = plan_memory(dataclasses.replace(L, **change, notes=[]))["total_bytes"]
        if total <= L.budget:
            found.append({"change": label, "total_bytes": total})
            batch_found = batch_found or "batch_size" in change
    if found:
        return found
    structural = [v for v in singles if "batch_size" not in v[1]]
    for i, (l1, c1) in enumerate(structural):
        for l2, c2 in structural[i + 1:]:
            if set(c1) & set(c2):
                continue
            total = plan_memory(dataclasses.replace(L, **c1, **c2, notes=[]))["total_bytes"]
            if total <= L.budget:
                found.append({"change": f"{l1} + {l2}", "total_bytes": total})
    return found


# ---------------------------------------------------------------------------------------- from a YAML
def layout_from_config(raw: Mapping, source: str = "config", devices: Optional[int] = None,
                       device_memory: Optional[str] = None, backend: str = "mindspore") -> Layout:
    """The :class:`Layout` of a run mapping (a mindformers-shaped YAML, as the runners read it)."""
    from glm_common.run_config import RunConfigError, settings_from_config
    if backend not in ("mindspore", "torch"):
        raise PlanError(f"--backend: expected mindspore or torch, got {backend!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = settings_from_config(raw, source=source, warn=False)
    except RunConfigError as e:
        raise PlanError(str(e)) from None
    par = raw.get("parallel") or {}
    rec = raw.get("recompute_config") or {}
    o = s.options
    L = Layout(config=s.config, method=s.pet.get("pet_type", "full"), pet=dict(s.pet), param_dtype=o.param_init_type,
               compute_dtype=o.compute_dtype, layernorm_dtype=o.layernorm_compute_type,
               softmax_dtype=o.softmax_compute_type, batch_size=int(s.batch_size),
               seq_length=int(s.max_source_length + s.max_target_length + 1),
               dp=int(s.data_parallel), mp=int(s.model_parallel), pp=int(s.pipeline_stage),
               micro_batch_num=int(s.micro_batch_num), vocab_emb_dp=bool(s.vocab_emb_dp),
               opt_shard=bool(par.get("enable_parallel_optimizer", False)), semi_auto=int(s.parallel_mode) in (1, 2),
               recompute=bool(s.gradient_checkpointing),
               comm_recompute=bool(rec.get("parallel_optimizer_comm_recompute", False)),
               backend=backend, device_target=s.device_target, source=source)
    if L.method == "qlora":
        L.method = "lora"
    if backend == "torch" and (L.mp > 1 or L.pp > 1):
        L.notes.append(f"torch_glm has no model or pipeline parallel: planned as data parallel over "
                       f"{L.devices} ranks")
        L.dp, L.mp, L.pp, L.micro_batch_num = L.devices, 1, 1, 1
    if devices is not None:
        if devices < 1 or devices % (L.mp * L.pp):
            raise PlanError(f"--devices: {devices} is not a multiple of model_parallel x pipeline_stage "
                            f"({L.mp} x {L.pp})")
        L.dp = devices // (L.mp * L.pp)
    if device_memory:
        L.budget, L.budget_source = parse_size(device_memory, "--device-memory"), "--device-memory"
    elif s.max_device_memory:
        L.budget = parse_size(s.max_device_memory, f"{source}: context.max_device_memory")
        L.budget_source = "context.max_device_memory"
    return L


def run_plan_line(raw: Mapping, source: str, devices: int, backend: str) -> Optional[str]:
    """The one plan line a trainer prints before it trains (``devices``: the world size), or None when no
    plan can be made for the mapping (the trainer's own checks report the YAML's problems)."""
    try:
        return plan_line(plan_memory(layout_from_config(raw, source=source, devices=devices, backend=backend)))
    except (PlanError, ValueError):
        return None


def plan_from_file(path: str, devices: Optional[int] = None, device_memory: Optional[str] = None,
                   backend: str = "mindspore") -> dict:
    """:func:`plan_memory` of the run YAML ``path``, with ``fixes`` when it does not fit."""
    from glm_common.run_config import RunConfigError, load_run_config
    try:
        raw = load_run_config(path)
    except RunConfigError as e:
        raise PlanError(str(e)) from None
    L = layout_from_config(raw, source=path, devices=devices, device_memory=device_memory, backend=backend)
    plan = plan_memory(L)
    plan["fixes"] = fixes(L) if plan["fits"] is False else []
    return plan


# ---------------------------------------------------------------------------------------- text
def _layout_words(p: dict) -> str:
    lay = p["layout"]
    words = [f"{lay['devices']} device{'s' if lay['devices'] != 1 else ''} = dp {lay['data_parallel']} x "
             f"mp {lay['model_parallel']} x pp {lay['pipeline_stage']}"]
    if lay["pipeline_stage"] > 1:
        words.append(f"{lay['micro_batch_num']} micro-batches")
    words.append("optimizer shard" if lay["optimizer_shard"] else "no optimizer shard")
    words.append("recompute" if lay["recompute"] else "no recompute")
    return ", ".join(words)


def plan_line(p: dict) -> str:
    """One line: the per-device total, the budget and the verdict."""
    if p["fits"] is None:
        verdict = "(no device memory given: context.max_device_memory or --device-memory)"
    else:
        verdict = f"of {format_size(p['budget_bytes'])} ({p['budget_source']}): " + \
                  ("fits" if p["fits"] else "does NOT fit")
    return (f"memory plan: {format_size(p['total_bytes'])} per device {verdict} [{p['method']}, "
            f"{_layout_words(p)}, batch {p['batch_size']} x seq {p['seq_length']}]")


def format_plan(p: dict) -> str:
    m, d = p["model"], p["dtypes"]
    method = {"full": "full fine-tune", "lora": "LoRA", "ptuning2": "P-tuning v2"}.get(p["method"], p["method"])
    lines = [f"memory plan ({p['backend']}) of {p['config']}: {method}, ChatGLM2 {m['layers']} layers x "
             f"{m['hidden_size']} ({m['parameters'] / 1e9:.3g}e9 parameters, {m['trained_parameters']:,} trained)",
             f"  dtypes: weights {d['param_init_type']}, compute {d['compute_dtype']}, norms "
             f"{d['layernorm_compute_type']}, softmax {d['softmax_compute_type']}, optimizer states "
             f"{d['optimizer_state']}",
             f"  layout: {_layout_words(p)}; batch {p['batch_size']} x seq {p['seq_length']} per device"]
    if p["layout"]["pipeline_stage"] > 1:
        lines.append(f"  pipeline stage {p['stage']} holds the most (stage totals: "
                     + ", ".join(format_size(t) for t in p["stage_totals_bytes"]) + ")")
    lines.append("  per device:")
    b, a = p["per_device_bytes"], p["activations_bytes"]
    names = {"weights": "weights", "gathered_weights": "gathered weights", "gradients": "gradients",
             "optimizer_states": "optimizer states", "master_weights": "float32 master weights", "activations": "activations", "workspace": "workspace"}
    for k, label in names.items():
        extra = ""
        if k == "activations":
            extra = f"  (without recompute {format_size(a['without_recompute'])}, with recompute " \
                    f"{format_size(a['with_recompute'])})"
        lines.append(f"    {label:<18}{format_size(b[k]):>12}{extra}")
    lines.append(f"    {'total':<18}{format_size(p['total_bytes']):>12}")
    for n in p["notes"]:
        lines.append(f"  note: {n}")
    lines.append(plan_line(p))
    if p["fits"] is False:
        if p["fixes"]:
            lines.append("  it would fit with:")
            for f in p["fixes"]:
                lines.append(f"    {f['change']}: {format_size(f['total_bytes'])}")
        else:
            lines.append("  no single change (or pair) of optimizer shard, recompute, model or pipeline parallel, "
                         "batch size makes it fit: more devices or a smaller model")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None, backend: Optional[str] = None) -> int:
    prog = {"mindspore": "python -m mindspore_glm.plan", "torch": "python -m torch_glm.plan"}.get(
        backend or "", "python -m glm_common.memory_plan")
    ap = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per-device memory of a training run from its YAML: weights, gradients, optimizer states, "
                    "activations (with and without recompute) and workspace, and whether it fits the device.",
        epilog="The arithmetic and every constant are described in glm_common/memory_plan.py.\n"
               "exit status: 0 fits (or no device memory given), 1 does not fit, 2 bad input\n"
               "example: python -m mindspore_glm.plan --config configs/glm2/run_glm2_6b_finetune.yaml "
               "--device-memory 32GB")
    ap.add_argument("--config", required=True, help="run YAML (configs/glm2/*.yaml, configs/tiny/*.yaml)")
    ap.add_argument("--devices", type=int, default=None,
                    help="devices of the run (default: data_parallel x model_parallel x pipeline_stage of the YAML); "
                         "data_parallel becomes devices / (model_parallel x pipeline_stage)")
    ap.add_argument("--device-memory", default=None, metavar="SIZE",
                    help="memory per device, e.g. 32GB (default: context.max_device_memory of the YAML)")
    ap.add_argument("--backend", choices=("mindspore", "torch"), default=backend or "mindspore",
                    help="whose engine runs it: mindspore (semi-auto/data parallel) or torch (DDP, or FSDP2 full "
                         "shard when parallel.enable_parallel_optimizer is True)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON (per-device total in total_bytes)")
    args = ap.parse_args(argv)
    try:
        plan = plan_from_file(args.config, args.devices, args.device_memory, args.backend)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 1 if plan["fits"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
