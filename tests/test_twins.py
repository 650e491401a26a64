"""The two backends are twins: ``mindspore_glm/X.py`` and ``torch_glm/X.py`` export the same names
(``__all__``) with the same signatures (parameter names, kinds and order; which ones have defaults),
their classes the same public methods (``construct`` is MindSpore's ``forward``) in the same order.

A divergence the frameworks force is listed in :data:`ALLOWED` with its reason; everything else must match.
A module both backends have whose engines share no public name (:data:`DIFFERENT_ENGINES`) is listed as a
whole, with its reason, and is not compared name by name.
"""
from __future__ import annotations

import importlib
import inspect
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("mindspore_glm", "torch_glm")

#: modules only one backend has (module name -> reason)
ONE_SIDED_MODULES = {
    "launch": "the Ascend launcher (rank tables, msrun); torch runs under torchrun",
    "launch_plan": "the Ascend launcher's process plan (rank tables, msrun); torch runs under torchrun",
    "dryrun": "MindSpore's DryRun compile of a semi-auto-parallel layout for an Ascend cluster (MS_SIMULATION_LEVEL); "
              "torch has no graph compile to simulate",
    "quantize": "weight-only int8/int4 serving on the torch backend (CPU and CUDA), ChatGLM2's quantize(bits)",
}

#: modules both backends have under one name whose engines differ, so no public name means the same thing on
#: both sides (module name -> reason); they are not compared name by name
DIFFERENT_ENGINES = {
    "parallel": "parallel.* of the run YAML drives two engines: MindSpore's semi-auto parallel (a sharding "
                "plan of operator strategies, model/pipeline parallel, its optimizer shard inside the graph) "
                "and torch's FSDP2 full shard (parameters, gradients and optimizer states split over the data "
                "parallel ranks, DCP checkpoints, gathered results); the functions of one have no "
                "counterpart in the other",
}

_DTYPES = "mindformers' per-cell dtypes (param_init_type, compute_dtype, ...) are constructor arguments in MindSpore; torch casts the module"
_STATIC_CACHE = "static KV cache: MindSpore's prefill/decode graphs take a preallocated cache, a slot mask and static shapes (GRAPH mode); torch's cache grows per step (HF interface)"
_HF = "the HF/transformers/peft interface torch users call (MindSpore has no transformers)"
_PREFIX = "P-tuning layout: mindpet's prefix encoder (top-level prefix_encoder.*, [2L, B, g, P, hn] out) vs HF's transformer.prefix_encoder ([B, P, kv] out)"
_PEFT = "LoRA layer: mindpet's in-place low-rank parameters on our Linear (MindSpore) vs peft's wrapper model (torch)"
_CELLS = "GRAPH-mode train-step cells (loss scale, accumulation buffers, overflow check in the graph); torch's step is eager autograd"
_CKPT = "checkpoint formats: mindformers' .ckpt with optimizer moments (MindSpore) vs a trainable.safetensors + trainer_state.safetensors/.json folder (torch)"
_PER_EPOCH = "MindSpore's checkpoint names carry <epoch>_<step in epoch> (mindformers'), so the global step needs the updates per epoch; torch's names carry the global step"
_DATA = "framework data containers: MindSpore GeneratorDataset vs torch DataLoader (both over glm_common.data.Batcher)"

#: ``(module, qualified name)`` -> reason: the names/signatures allowed to differ. A qualified name ending
#: in ``.*`` covers every method of that class.
ALLOWED = {
    # model
    ("model", "RMSNorm.__init__"): _DTYPES, ("model", "SelfAttention.__init__"): _DTYPES,
    ("model", "MLP.__init__"): _DTYPES, ("model", "GLMBlock.__init__"): _DTYPES,
    ("model", "GLMTransformer.__init__"): _DTYPES, ("model", "ChatGLM2Model.__init__"): _DTYPES,
    ("model", "Embedding.__init__"): _DTYPES, ("model", "ChatGLM2ForConditionalGeneration.__init__"): _DTYPES,
    ("model", "Linear"): "MindSpore's own Linear cell carries mindformers' dtypes and mindpet's LoRA parameters; torch uses nn.Linear",
    ("model", "ms_dtype"): "MindSpore dtype lookup (torch dtypes resolve in from_pretrained)",
    ("model", "DTYPE_NAMES"): "MindSpore dtype table (torch's is DTYPES)",
    ("model", "DTYPES"): "torch dtype table (MindSpore's is DTYPE_NAMES, glm_common.config.DTYPES is the names)",
    ("model", "ModelConfig"): _HF,
    ("model", "rope_tables"): "MindSpore rotates with full-width cos/sin tables and a pair-swap matmul: static shapes for GRAPH mode",
    ("model", "pair_swap_matrix"): "MindSpore rotates with full-width cos/sin tables and a pair-swap matmul: static shapes for GRAPH mode",
    ("model", "apply_rope_tables"): "MindSpore rotates with full-width cos/sin tables and a pair-swap matmul: static shapes for GRAPH mode",
    ("model", "lazy_parameters"): "MindSpore's lazy initializer for a model built only to be compiled (DryRun); torch has no compile-only build",
    ("model", "broadcasts_explicitly"): "MindSpore's CPU runtime held full-size buffers for broadcasting Mul/Add in a GRAPH train step: its cells broadcast explicitly there (torch's eager ops free them)",
    ("model", "SelfAttention.forward"): _STATIC_CACHE, ("model", "GLMBlock.forward"): _STATIC_CACHE,
    ("model", "GLMTransformer.forward"): _STATIC_CACHE, ("model", "ChatGLM2Model.forward"): _STATIC_CACHE,
    ("model", "ChatGLM2Model.get_prompt"): _PREFIX,
    ("model", "ChatGLM2Model.rope"): "MindSpore's cos/sin tables are made once in rotary_dtype (static graph constants); torch rounds its table rows to the input dtype per call",
    ("model", "ChatGLM2ForConditionalGeneration.forward"): _HF + "; " + _STATIC_CACHE,
    ("model", "ChatGLM2ForConditionalGeneration.prefill"): _STATIC_CACHE,
    ("model", "ChatGLM2ForConditionalGeneration.prefill_after"): _STATIC_CACHE + " (torch's forward takes past_key_values)",
    ("model", "ChatGLM2ForConditionalGeneration.decode"): _STATIC_CACHE,
    ("model", "ChatGLM2ForConditionalGeneration.load_weights"): "MindSpore sets (name, array) pairs into its Parameters, checking names and shapes; torch streams into load_state_dict-style copies inside from_pretrained",
    ("model", "ChatGLM2ForConditionalGeneration.param_dict"): "MindSpore's name -> Parameter map (torch: named_parameters)",
    ("model", "ChatGLM2ForConditionalGeneration.from_pretrained"): "loading options: mindformers' dtypes and RunOptions (MindSpore, also .ckpt files) vs transformers' torch_dtype and device (torch)",
    ("model", "ChatGLM2ForConditionalGeneration.save_pretrained"): "output format: one MindSpore .ckpt with mindformers names vs HF safetensors/bin shards (transformers' arguments)",
    ("model", "ChatGLM2ForConditionalGeneration.enable_input_require_grads"): _HF,
    ("model", "ChatGLM2ForConditionalGeneration.get_input_embeddings"): _HF,
    ("model", "ChatGLM2ForConditionalGeneration.get_output_embeddings"): _HF,
    ("model", "ChatGLM2ForConditionalGeneration.gradient_checkpointing_enable"): _HF,
    ("model", "ChatGLM2ForConditionalGeneration.gradient_checkpointing_disable"): _HF,
    # generate
    ("generate", "GenerationMixin.prepare_inputs_for_generation"): _HF,
    ("generate", "process_logits"): "MindSpore processes the scores on the host in numpy in one call; torch's processors are the separate apply_* steps",
    ("generate", "apply_repetition_penalty"): "torch logits processors (MindSpore: process_logits)",
    ("generate", "apply_temperature"): "torch logits processors (MindSpore: process_logits)",
    ("generate", "apply_top_k"): "torch logits processors (MindSpore: process_logits)",
    ("generate", "apply_top_p"): "torch logits processors (MindSpore: process_logits)",
    # prefix
    ("prefix", "PrefixEncoder.*"): _PREFIX,
    ("prefix", "load_prefix"): "torch's P-tuning result is prefix_encoder.safetensors; MindSpore's prefix weights travel in its .ckpt",
    ("prefix", "prefix_state_dict"): "torch's P-tuning result is prefix_encoder.safetensors; MindSpore's prefix weights travel in its .ckpt",
    # lora
    ("lora", "lora_layers"): _PEFT, ("lora", "unmerge_lora"): _PEFT, ("lora", "lora_state"): _PEFT,
    ("lora", "mark_only_lora_trainable"): _PEFT, ("lora", "lora_config"): _PEFT, ("lora", "save_lora"): _PEFT,
    ("lora", "load_lora"): _PEFT, ("lora", "apply_ptuning"): _PEFT, ("lora", "apply_lora"): _PEFT,
    ("lora", "quantize_4bit"): "QLoRA needs CUDA and bitsandbytes (torch only)",
    ("lora", "apply_qlora"): "QLoRA needs CUDA and bitsandbytes (torch only)",
    # data
    ("data", "BatchSource"): _DATA, ("data", "BatchDataset"): _DATA, ("data", "EpochSampler"): _DATA,
    ("data", "make_dataloader"): "torch's name for make_dataset",
    # train_step
    ("train_step", "AdamWeightDecay"): "MindSpore ships nn.AdamWeightDecay; torch needs its own (same formula)",
    ("train_step", "sum_squares"): _CELLS, ("train_step", "TrainOneStepCell"): _CELLS,
    ("train_step", "AccumulateCell"): _CELLS,
    ("train_step", "saturation_mode"): "Ascend's float-status overflow register (saturation mode) exists only for MindSpore",
    ("train_step", "FloatStatus"): "Ascend's float-status overflow register (saturation mode) exists only for MindSpore",
    ("train_step", "master_grads"): "torch's eager step moves the float16 gradients to the float32 masters itself; MindSpore's optimizer takes them inside TrainOneStepCell",
    ("train_step", "master_weights_to_model"): "torch's eager step casts the masters into the model itself; MindSpore's TrainOneStepCell does it in the graph",
    # checkpointing
    ("checkpointing", "save_checkpoint"): _CKPT, ("checkpointing", "load_checkpoint"): _CKPT,
    ("checkpointing", "is_adapter_checkpoint"): "mindformers' --load_checkpoint of a LoRA/prefix-only .ckpt (torch loads adapter folders)",
    ("checkpointing", "save_result"): "torch writes the run's result as peft adapter / prefix / HF folders; MindSpore's result is the last .ckpt",
    ("checkpointing", "trainable_state"): _CKPT,
    ("checkpointing", "base_model"): "torch's model may sit in peft and DDP wrappers; MindSpore's never does",
    ("checkpointing", "load_weights"): "MindSpore loads base or adapter weights from a .ckpt; torch from HF folders (from_pretrained) and peft",
    # resume
    ("resume", "record_tensors"): _CKPT + "; MindSpore's run record is two int32 scalars at the end of the .ckpt",
    ("resume", "STATE_JSON"): _CKPT, ("resume", "STATE_TENSORS"): _CKPT, ("resume", "WEIGHTS"): _CKPT,
    ("resume", "save_trainer_state"): _CKPT, ("resume", "load_trainer_state"): _CKPT,
    ("resume", "rng_state"): _CKPT, ("resume", "set_rng_state"): _CKPT,
    ("resume", "DCP_METADATA"): "torch's sharded (FSDP2) checkpoints are torch.distributed.checkpoint's; MindSpore's sharded runs write per-rank .ckpt",
    ("resume", "SafeReader"): "DCP's metadata reader without running a pickle's code (torch only: DCP)",
    ("resume", "SafeLoadPlanner"): "DCP's load planner without running a pickle's code (torch only: DCP)",
    ("resume", "check_dcp"): "verification of a DCP (FSDP2) checkpoint (torch only: DCP)",
    ("resume", "candidates"): _PER_EPOCH, ("resume", "resume_checkpoint"): _PER_EPOCH,
    # train
    ("train", "init_weights"): "MindSpore's cells are created with zeros and drawn here from the seed; torch modules initialise themselves",
    ("train", "set_context"): "mindspore.set_context (device, GRAPH/PYNATIVE); torch picks a device per tensor",
    ("train", "build_model"): "MindSpore loads a LoRA/prefix-only .ckpt over the base (adapter) and builds compile-only models (weights=False, DryRun); torch places the model on a device",
    ("train", "build_step"): _CELLS,
    ("train", "train"): "MindSpore takes the trainable parameters with the model (GRAPH cells need them); torch a device",
}


def _allowed(mod: str, qual: str) -> bool:
    if (mod, qual) in ALLOWED:
        return True
    cls = qual.split(".", 1)[0]
    return (mod, cls + ".*") in ALLOWED and "." in qual


def _modules(pkg: str) -> set:
    d = os.path.join(ROOT, pkg)
    return {f[:-3] for f in os.listdir(d) if f.endswith(".py") and not f.startswith("_")}


def _shape(obj) -> list:
    """``[(name, kind, has default), ...]`` of a callable's signature, ``self``/``cls`` left out, and a
    ``**kwargs`` catch-all too (transformers and peft pass extra keyword arguments to torch models)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    return [(p.name, p.kind.name, p.default is not inspect.Parameter.empty)
            for p in sig.parameters.values() if p.name not in ("self", "cls") and p.kind != p.VAR_KEYWORD]


def _methods(cls) -> list:
    """Public methods a class defines itself (plus ``__init__``), ``construct`` read as ``forward``."""
    out = []
    for name, value in vars(cls).items():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if not callable(value) or (name.startswith("_") and name != "__init__"):
            continue
        out.append(("forward" if name == "construct" else name, value))
    return out


def divergences(ms_mod, pt_mod, mod: str, order: bool = True) -> list:
    """Every difference between the twin modules that :data:`ALLOWED` does not explain (``order``: the
    order of the classes in the files too, which the allow-list does not touch)."""
    problems = []
    ms_all, pt_all = list(getattr(ms_mod, "__all__", [])), list(getattr(pt_mod, "__all__", []))
    for name in sorted(set(ms_all) ^ set(pt_all)):
        if not _allowed(mod, name):
            side = "mindspore_glm" if name in ms_all else "torch_glm"
            problems.append(f"{mod}.{name}: only in {side}.{mod}.__all__")
    common = [n for n in ms_all if n in pt_all]
    if [n for n in pt_all if n in common] != common:
        problems.append(f"{mod}: __all__ order differs: {common} vs {[n for n in pt_all if n in common]}")
    classes = [n for n in common if inspect.isclass(getattr(ms_mod, n)) and inspect.isclass(getattr(pt_mod, n))]
    for name in common:
        a, b = getattr(ms_mod, name), getattr(pt_mod, name)
        if _allowed(mod, name):
            continue
        if inspect.isclass(a) != inspect.isclass(b) or callable(a) != callable(b):
            problems.append(f"{mod}.{name}: a class/function in one backend, not in the other")
            continue
        if inspect.isclass(a):
            if issubclass(a, BaseException):
                continue
            ma, mb = dict(_methods(a)), dict(_methods(b))
            for meth in sorted(set(ma) ^ set(mb)):
                if not _allowed(mod, f"{name}.{meth}"):
                    problems.append(f"{mod}.{name}.{meth}: only in {'mindspore_glm' if meth in ma else 'torch_glm'}")
            for meth in [m for m in ma if m in mb]:
                if not _allowed(mod, f"{name}.{meth}") and _shape(ma[meth]) != _shape(mb[meth]):
                    problems.append(f"{mod}.{name}.{meth}: signature {_shape(ma[meth])} vs {_shape(mb[meth])}")
        elif callable(a) and _shape(a) != _shape(b):
            problems.append(f"{mod}.{name}: signature {_shape(a)} vs {_shape(b)}")
    if not order:
        return problems
    # the classes both have, in the same order in the file
    order_a = [n for n in classes if getattr(ms_mod, n).__module__ == ms_mod.__name__]
    order_b = [n for n in classes if getattr(pt_mod, n).__module__ == pt_mod.__name__]
    key_a = sorted(order_a, key=lambda n: inspect.getsourcelines(getattr(ms_mod, n))[1])
    key_b = sorted(order_b, key=lambda n: inspect.getsourcelines(getattr(pt_mod, n))[1])
    if [n for n in key_a if n in key_b] != [n for n in key_b if n in key_a]:
        problems.append(f"{mod}: class order differs: {key_a} vs {key_b}")
    return problems


def test_same_file_set():
    ms_mods, pt_mods = _modules(BACKENDS[0]), _modules(BACKENDS[1])
    odd = sorted(m for m in ms_mods ^ pt_mods if m not in ONE_SIDED_MODULES)
    assert not odd, f"modules in one backend only: {odd}"


TWINS = sorted((_modules(BACKENDS[0]) & _modules(BACKENDS[1])) - set(DIFFERENT_ENGINES))


@pytest.mark.parametrize("mod", sorted(DIFFERENT_ENGINES))
def test_different_engines_are_live(mod):
    """A :data:`DIFFERENT_ENGINES` entry names a module both backends have, with a reason, and is not
    also listed as one-sided."""
    assert mod not in ONE_SIDED_MODULES
    assert len(DIFFERENT_ENGINES[mod]) > 10
    for backend in BACKENDS:
        assert mod in _modules(backend), f"{backend}/{mod}.py is gone: drop the entry (or move it to ONE_SIDED_MODULES)"


@pytest.mark.parametrize("mod", TWINS)
def test_twin_module(mod):
    ms_mod = importlib.import_module(f"mindspore_glm.{mod}")
    pt_mod = importlib.import_module(f"torch_glm.{mod}")
    problems = divergences(ms_mod, pt_mod, mod)
    assert not problems, "\n".join(problems)


def test_allow_list_is_live():
    """Every allow-list entry names a module both backends have (or one listed as one-sided) and gives a reason."""
    for (mod, _), reason in ALLOWED.items():
        assert reason and len(reason) > 10
        assert mod in TWINS or mod in ONE_SIDED_MODULES or mod in DIFFERENT_ENGINES, \
            f"allow-list entry for unknown twin module {mod}"


def test_every_allow_list_entry_is_needed():
    """An entry of :data:`ALLOWED` for a twin module explains a difference that exists: without it the twin
    check of that module names it. (An entry whose difference is gone is stale: drop it.)"""
    stale = []
    for (mod, qual), reason in list(ALLOWED.items()):
        if mod not in TWINS:
            continue
        ms_mod, pt_mod = (importlib.import_module(f"{b}.{mod}") for b in BACKENDS)
        del ALLOWED[mod, qual]
        try:
            problems = divergences(ms_mod, pt_mod, mod, order=False)
        finally:
            ALLOWED[mod, qual] = reason
        prefix = f"{mod}.{qual[:-2] if qual.endswith('.*') else qual}"
        if not any(p.startswith(prefix) for p in problems):
            stale.append((mod, qual))
    assert not stale, f"allow-list entries that explain no difference: {stale}"
