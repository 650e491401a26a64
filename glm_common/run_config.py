"""The mindformers-shaped run YAML both backends read, flattened into :class:`TrainSettings`.

Keys honoured (mindformers keys without effect here, :data:`MINDFORMERS_RUN_IGNORED`, are listed once in a
:class:`RunConfigWarning`; any other key is an error with a "did you mean" (``difflib``); a key given twice
in one mapping is an error (:func:`load_yaml`); a bad value raises :class:`RunConfigError` naming the file
and the key's path):

* ``seed``, ``run_mode``, ``output_dir``, ``load_checkpoint``, ``resume_training``, ``do_eval``,
  ``eval_step_interval``;
* ``context``: ``mode`` (0 GRAPH, 1 PYNATIVE), ``device_target``, ``device_id``, ``max_device_memory``;
* ``model.model_config`` (:meth:`ChatGLM2Config.from_model_config`; its mindformers-only keys join the
  warning) with ``pet_config`` (``pet_type: lora`` with ``lora_rank``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules``; ``ptuning2`` with ``pre_seq_len``, ``prefix_projection``,
  ``dropout_prob``); ``model.arch.type``;
* ``train_dataset`` / ``eval_dataset``: ``data_loader.{type, dataset_dir, shuffle, phase, version,
  origin_columns, format, mode}``, ``tokenizer.{type, vocab_file}``, ``input_columns``,
  ``max_source_length``, ``max_target_length``, ``ignore_pad_token_for_loss``, ``batch_size``,
  ``drop_remainder``, ``seed``, ``padding``, ``num_samples`` (eval);
* ``runner_config``: ``epochs``, ``batch_size``, ``sink_mode``, ``sink_size``,
  ``gradient_accumulation_steps``, ``max_steps``;
* ``runner_wrapper``: ``type``, ``scale_sense`` (``DynamicLossScaleUpdateCell`` with
  ``loss_scale_value``, ``scale_factor``, ``scale_window``; ``FixedLossScaleUpdateCell`` with
  ``loss_scale_value``; or a number), ``use_clip_grad``, ``max_grad_norm``,
  ``max_consecutive_overflows`` (ours, default 20: a run whose updates overflow that many times in a
  row stops with one line, a stuck loss scale);
* ``lr_schedule``: ``type`` (see :mod:`glm_common.schedules`), ``learning_rate``, ``lr_end``,
  ``warmup_steps``, ``warmup_ratio``, ``total_steps`` (-1: epochs x steps per epoch), ``power``;
* ``optimizer``: ``type`` (AdamWeightDecay family or AdamW), ``beta1``, ``beta2``, ``eps``,
  ``weight_decay``, ``learning_rate``;
* ``callbacks``: ``MFLossMonitor`` (``per_print_times``), ``CheckpointMonitor`` (``prefix``,
  ``save_checkpoint_steps``, ``keep_checkpoint_max``, ``save_full_weights``);
* ``use_parallel``, ``parallel.{parallel_mode, gradients_mean, enable_parallel_optimizer}``,
  ``parallel_config.{data_parallel, model_parallel, pipeline_stage, micro_batch_num, vocab_emb_dp}``;
* ``processor.tokenizer.{type, vocab_file}``, ``metric.type`` (``ADGENMetric``);
* ``recompute_config.recompute``; the other scale-out keys: :mod:`glm_common.parallel_keys`.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from glm_common.config import ChatGLM2Config, ConfigError, RunOptions, did_you_mean
from glm_common.schedules import BIAS_CORRECTED, OPTIMIZERS, SCHEDULES

__all__ = ["RunConfigError", "RunConfigWarning", "TrainSettings", "load_run_config", "load_yaml", "settings_from_config",
           "pet_settings", "parse_bool", "RUN_MODES", "PET_TYPES", "MINDFORMERS_RUN_IGNORED"]

RUN_MODES = ("train", "finetune", "eval", "predict")
PET_TYPES = ("lora", "ptuning2", "qlora")
_CKPT_MONITORS = ("checkpointmonitor", "checkpointmointor")


class RunConfigError(ValueError):
    """A run YAML that cannot be used; one line naming the file and the key's path."""


class RunConfigWarning(UserWarning):
    """Keys of a run YAML that mean nothing to this stack (listed once)."""


@dataclass
class TrainSettings:
    """Everything a run needs, flattened from the YAML (see the module docstring for the keys)."""

    config: ChatGLM2Config
    options: RunOptions = field(default_factory=RunOptions)
    pet: dict = field(default_factory=lambda: {"pet_type": "full"})
    source: str = "config"
    run_mode: str = "finetune"
    load_checkpoint: str = ""
    vocab_file: str = ""
    train_file: str = ""
    eval_file: str = ""
    data_format: Optional[str] = None
    feature_mode: str = "official"
    padding: str = "max_length"
    max_source_length: int = 64
    max_target_length: int = 128
    eval_max_source_length: int = 64
    eval_max_target_length: int = 128
    eval_num_samples: int = 0
    eval_batch_size: int = 8
    do_eval: bool = False
    eval_step_interval: int = -1
    shuffle: bool = True
    data_seed: int = 0
    drop_remainder: bool = True
    epochs: int = 1
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = -1
    sink_mode: bool = False
    sink_size: int = 1
    clip_grad: bool = True
    max_grad_norm: float = 1.0
    loss_scale_dynamic: bool = False
    loss_scale_value: float = 1.0
    loss_scale_factor: float = 2.0
    loss_scale_window: int = 1000
    max_consecutive_overflows: int = 20
    optimizer_type: str = "adamweightdecay"
    bias_correction: bool = False
    learning_rate: float = 5e-5
    lr_end: float = 0.0
    schedule: str = "polynomial"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    total_steps: int = -1
    power: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    print_every: int = 1
    ckpt_prefix: str = "glm2"
    save_steps: int = 0
    keep_max: int = 1
    save_full_weights: bool = False
    seed: int = 0
    output_dir: str = "./output"
    resume: bool = False
    compute_dtype: str = "float32"
    gradient_checkpointing: bool = False
    context_mode: int = 0
    device_target: str = "CPU"
    device_id: int = 0
    max_device_memory: str = ""
    use_parallel: bool = False
    parallel_mode: int = 0
    gradients_mean: bool = True
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    vocab_emb_dp: bool = True
    #: shard parameters, gradients and optimizer states over the ranks (torch: FSDP2 under torchrun)
    enable_parallel_optimizer: bool = False
    num_workers: int = 0
    progress: bool = True
    #: the scale-out keys (:func:`glm_common.parallel_keys.read_parallel_keys`)
    scaleout: dict = field(default_factory=dict)
    #: ``metric.type`` as canonical names (:data:`glm_common.metrics.METRIC_TYPES`), in order
    metrics: list = field(default_factory=lambda: ["ADGENMetric"])
    #: ``train_dataset.ignore_pad_token_for_loss``: False scores the padding (pad id) as mindformers does
    ignore_pad_token_for_loss: bool = True
    #: ``lr_scale``/``lr_scale_factor`` already folded into ``learning_rate`` (kept for the record)
    lr_scale: bool = False
    #: dotted paths of the keys that mean nothing here (warned once by settings_from_config)
    ignored: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------- YAML
def _strict_loader():
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last one)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        hash(key)
                    except TypeError:
                        continue
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}; the last one "
                            f"would win silently)", key_node.start_mark)
                    seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    return StrictLoader


def load_yaml(path: str, error=None):
    """The YAML file ``path`` parsed with duplicate keys refused; ``error`` (default :class:`RunConfigError`)
    names the file and line of a problem."""
    import yaml
    error = error or RunConfigError
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_strict_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise error(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_run_config(path: str) -> dict:
    """Parse a run YAML into a mapping; errors name the file and line."""
    if not os.path.isfile(path):
        raise RunConfigError(f"{path}: no such file")
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise RunConfigError(f"{path}: expected a mapping at the top level")
    return data


def parse_bool(value, what: str = "value") -> bool:
    """``True``/``False`` (YAML or command-line strings ``True``, ``false``, ``1``, ``0``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise RunConfigError(f"{what}: expected true or false, got {value!r}")


_MISSING = object()

#: keys of mindformers' run YAMLs that have no effect here: accepted and named in the one warning
#: (``callbacks[]`` stands for any callback's index; a key stands for its whole subtree). Any other key
#: the reader does not honour is an error.
MINDFORMERS_RUN_IGNORED = frozenset({
    "remote_save_url", "auto_tune", "filepath_prefix", "autotune_per_step", "profile", "profile_start_step",
    "profile_stop_step", "init_start_profile", "profile_communication", "profile_memory", "local_rank",
    "device_num", "swap_config", "ascend_config",
    "context.enable_graph_kernel", "context.graph_kernel_flags", "context.max_call_depth", "context.save_graphs",
    "context.save_graphs_path", "context.jit_config", "context.memory_optimize_level",
    "context.runtime_num_threads", "context.ascend_config", "context.mempool_block_size",
    "context.enable_compile_cache", "context.compile_cache_path", "context.jit_level", "context.infer_boost",
    "parallel.enable_alltoall", "parallel.loss_repeated_mean", "parallel.full_batch", "parallel.search_mode",
    "parallel.strategy_ckpt_config", "parallel.strategy_ckpt_save_file", "parallel.dataset_strategy",
    "parallel.pipeline_config", "parallel.parallel_optimizer_config",
    "parallel_config.expert_parallel", "parallel_config.gradient_aggregation_group",
    "parallel_config.use_seq_parallel", "parallel_config.optimizer_shard", "parallel_config.context_parallel",
    "recompute_config.select_recompute", "recompute_config.parallel_optimizer_comm_recompute",
    "recompute_config.mp_comm_recompute", "recompute_config.recompute_slice_activation",
    "recompute_config.select_comm_recompute", "moe_config", "trainer",
    "callbacks[].integrated_save", "callbacks[].async_save", "callbacks[].save_checkpoint_seconds",
    "callbacks[].keep_checkpoint_per_n_minutes", "callbacks[].directory", "callbacks[].remove_redundancy",
    "callbacks[].checkpoint_format", "callbacks[].save_network_params", "callbacks[].save_trainable_params",
    "callbacks[].embedding_local_norm_threshold", "callbacks[].learning_rate", "callbacks[].micro_batch_num",
    "callbacks[].micro_batch_interleave_num", "callbacks[].origin_epochs", "callbacks[].dataset_size",
    "callbacks[].initial_epoch", "callbacks[].initial_step", "callbacks[].global_batch_size",
    "callbacks[].gradient_accumulation_steps", "callbacks[].check_for_nan_in_loss_and_grad",
})
#: mindformers callback types: the two honoured (:func:`_callbacks`) and the ones named as ignored.
MINDFORMERS_CALLBACKS = ("MFLossMonitor", "CheckpointMonitor", "CheckpointMointor", "ObsMonitor", "SummaryMonitor",
                         "ProfileMonitor", "EvalCallBack", "TrainingStateMonitor", "TrainCallBack")
#: mindformers pet_config keys without meaning here (named in the warning).
MINDFORMERS_PET_IGNORED = frozenset({"projection_dim", "freeze_include", "freeze_exclude", "lora_a_init",
                                     "lora_b_init", "param_init_type", "compute_dtype", "exclude_layers"})


def _mindformers_ignored(path: str) -> bool:
    norm = re.sub(r"\[\d+\]", "[]", path)
    return any(norm == k or norm.startswith(k + ".") for k in MINDFORMERS_RUN_IGNORED)


def _refuse_unknown(source: str, unread: list, known, join: str = ": ") -> None:
    """:class:`RunConfigError` for the first key of ``unread`` that is neither honoured nor a mindformers key
    named as ignored, with the closest known key."""
    for path in unread:
        if _mindformers_ignored(path):
            continue
        cands = set()
        for k in known:
            parts = k.split(".")
            cands.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        raise RunConfigError(f"{source}{join}{path}: unknown key" + did_you_mean(path, sorted(cands)))


class _Reader:
    """Typed access to dotted paths of a mapping; remembers what was read to list the rest."""

    def __init__(self, cfg: Mapping, source: str):
        self.cfg, self.source = cfg, source
        self.join = ": "        # between source and key path (".": the source is itself a key path)
        self.seen: set = set()

    def fail(self, path: str, msg: str):
        raise RunConfigError(f"{self.source}{self.join}{path}: {msg}")

    def raw(self, path: str, default=None, root: Any = _MISSING, prefix: str = ""):
        cur: Any = self.cfg if root is _MISSING else root
        self.seen.add(path)
        for part in path.split("."):
            if not isinstance(cur, Mapping) or part not in cur:
                return default
            cur = cur[part]
        return default if cur is None or cur == "None" else cur

    def int(self, path, default, lo: Optional[int] = None, **kw) -> int:
        v = self.raw(path, default, **kw)
        full = kw.get("prefix", "") + path
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, str):
            try:
                v = int(float(v)) if float(v).is_integer() else v
            except ValueError:
                pass
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(full, f"expected an integer, got {v!r}")
        if lo is not None and v < lo:
            self.fail(full, f"must be >= {lo}, got {v}")
        return v

    def float(self, path, default, lo: Optional[float] = None, hi: Optional[float] = None, open_lo=False,
              open_hi=False, **kw) -> float:
        v = self.raw(path, default, **kw)
        full = kw.get("prefix", "") + path
        try:
            if isinstance(v, bool):
                raise ValueError
            v = float(v)
        except (TypeError, ValueError):
            self.fail(full, f"expected a number, got {v!r}")
        if v != v or v in (float("inf"), float("-inf")):
            self.fail(full, f"expected a finite number, got {v!r}")
        if lo is not None and (v < lo or (open_lo and v == lo)):
            self.fail(full, f"must be {'>' if open_lo else '>='} {lo}, got {v}")
        if hi is not None and (v > hi or (open_hi and v == hi)):
            self.fail(full, f"must be {'<' if open_hi else '<='} {hi}, got {v}")
        return v

    def bool(self, path, default, **kw) -> bool:
        v = self.raw(path, default, **kw)
        try:
            return parse_bool(v, f"{self.source}{self.join}{kw.get('prefix', '')}{path}")
        except RunConfigError as e:
            raise RunConfigError(str(e)) from None

    def str(self, path, default, choices=None, **kw) -> str:
        v = self.raw(path, default, **kw)
        full = kw.get("prefix", "") + path
        if not isinstance(v, str):
            self.fail(full, f"expected a string, got {v!r}")
        if choices is not None and v.lower() not in choices:
            self.fail(full, f"expected one of {', '.join(choices)}, got {v!r}")
        return v

    def unread(self, node: Any = _MISSING, prefix: str = "") -> list:
        """Dotted paths present in the mapping that were never read (subtrees reported once)."""
        node = self.cfg if node is _MISSING else node
        out = []
        if not isinstance(node, Mapping):
            return out
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path in self.seen and not isinstance(value, Mapping):
                continue
            inner = any(s.startswith(path + ".") for s in self.seen)
            if isinstance(value, Mapping) and inner:
                out.extend(self.unread(value, path + "."))
            elif path not in self.seen:
                out.append(path)
        return out


# ---------------------------------------------------------------------------------------- pet_config
def pet_settings(pet_config: Optional[Mapping[str, Any]], source: str = "pet_config") -> dict:
    """Normalise a mindformers ``pet_config`` into ``{"pet_type": ..., options}``; None: full fine-tuning.

    LoRA: ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``; P-tuning v2: ``pre_seq_len``,
    ``prefix_projection``, ``dropout_prob``. ``ignored`` lists the keys that mean nothing here.
    """
    if not pet_config:
        return {"pet_type": "full", "ignored": []}
    if not isinstance(pet_config, Mapping):
        raise RunConfigError(f"{source}: expected a mapping, got {type(pet_config).__name__}")
    r = _Reader(pet_config, source)
    pet_type = str(pet_config.get("pet_type", "")).lower()
    r.seen.add("pet_type")
    if pet_type not in PET_TYPES:
        raise RunConfigError(f"{source}.pet_type: expected one of {', '.join(PET_TYPES)}, "
                             f"got {pet_config.get('pet_type')!r}")
    r.join = "."
    if pet_type in ("lora", "qlora"):
        rank = r.int("lora_rank", pet_config.get("r", 8), lo=1)
        r.seen.add("r")
        targets = r.raw("target_modules", "query_key_value")
        if not isinstance(targets, (str, list)) or (isinstance(targets, list)
                                                     and not all(isinstance(t, str) for t in targets)):
            r.fail("target_modules", f"expected a regular expression or a list of names, got {targets!r}")
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                r.fail("target_modules", f"{targets!r} is not a valid regular expression ({e})")
        out = {"pet_type": pet_type, "r": rank, "lora_alpha": r.float("lora_alpha", 32, lo=0, open_lo=True),
               "lora_dropout": r.float("lora_dropout", 0.1, lo=0, hi=1, open_hi=True), "target_modules": targets}
    else:
        if "pre_seq_len" not in pet_config or pet_config["pre_seq_len"] in (None, "None"):
            raise RunConfigError(f"{source}.pre_seq_len: missing (required for ptuning2)")
        out = {"pet_type": "ptuning2", "pre_seq_len": r.int("pre_seq_len", None, lo=1),
               "prefix_projection": r.bool("prefix_projection", False),
               "dropout_prob": r.float("dropout_prob", 0.1, lo=0, hi=1, open_hi=True)}
    for k in r.unread():
        if k not in MINDFORMERS_PET_IGNORED:
            r.fail(k, "unknown key" + did_you_mean(k, sorted(r.seen | MINDFORMERS_PET_IGNORED)))
    out["ignored"] = [f"{source}.{k}" for k in r.unread()]
    return out


# ---------------------------------------------------------------------------------------- settings
def _callbacks(r: _Reader, s: TrainSettings, ignored: list) -> None:
    cbs = r.cfg.get("callbacks")
    r.seen.add("callbacks")
    if cbs is None:
        return
    if not isinstance(cbs, list):
        r.fail("callbacks", f"expected a list of callbacks, got {type(cbs).__name__}")
    for i, cb in enumerate(cbs):
        where = f"callbacks[{i}]"
        if not isinstance(cb, Mapping):
            r.fail(where, f"expected a mapping with a type, got {cb!r}")
        sub = _Reader(cb, r.source)
        ctype = sub.str("type", "", prefix=f"{where}.").lower()
        if ctype == "mflossmonitor":
            s.print_every = sub.int("per_print_times", 1, lo=1, prefix=f"{where}.")
        elif ctype in _CKPT_MONITORS:
            s.ckpt_prefix = sub.str("prefix", s.ckpt_prefix, prefix=f"{where}.")
            s.save_steps = sub.int("save_checkpoint_steps", 0, prefix=f"{where}.")
            if "save_checkpoint_steps" in cb and s.save_steps < 1:
                sub.fail(f"{where}.save_checkpoint_steps", f"must be >= 1 (steps between checkpoints; the last "
                         f"step is always saved, so a value beyond the run saves only that), got {s.save_steps}")
            s.keep_max = sub.int("keep_checkpoint_max", 1, lo=1, prefix=f"{where}.")
            s.save_full_weights = sub.bool("save_full_weights", False, prefix=f"{where}.")
        else:
            if str(cb.get("type")) not in MINDFORMERS_CALLBACKS:
                r.fail(f"{where}.type", f"unknown callback {cb.get('type')!r}"
                       + did_you_mean(cb.get("type"), MINDFORMERS_CALLBACKS))
            ignored.append(f"{where} (type {cb.get('type')!r})")
            continue
        extra = [f"{where}.{k}" for k in sub.unread()]
        _refuse_unknown(r.source, extra, [f"{where}.{k}" for k in sub.seen] + [f"{where}.{k.split('.', 1)[1]}" for k in
                                          MINDFORMERS_RUN_IGNORED if k.startswith("callbacks[].")])
        ignored.extend(extra)


#: mindformers' ChatGLM2Tokenizer keyword defaults: names of the special tokens ``tokenizer.model`` fixes
TOKENIZER_SPECIALS = {"bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "mask_token": "[MASK]",
                      "gmask_token": "[gMASK]", "pad_token": "<pad>", "unk_token": "<unk>"}


def _special_tokens(r: _Reader) -> None:
    """``processor.tokenizer`` / ``*_dataset.tokenizer`` special tokens: ChatGLM2's are fixed by its
    tokenizer.model (``[gMASK]``, ``sop``, ``eop`` after the pieces; eos ``</s>``, pad = unk): mindformers'
    defaults are accepted as naming them, any other value would change the ids and is refused."""
    for part in ("processor.tokenizer", "train_dataset.tokenizer", "eval_dataset.tokenizer"):
        for key, default in TOKENIZER_SPECIALS.items():
            value = r.raw(f"{part}.{key}")
            if value is not None and value != default:
                r.fail(f"{part}.{key}", f"ChatGLM2's special tokens are fixed by tokenizer.model; only mindformers' "
                       f"{default!r} is accepted, got {value!r}")
    if str(r.raw("processor.type", "GLMProcessor")).lower() not in ("glmprocessor", "chatglm2processor"):
        r.fail("processor.type", f"expected GLMProcessor, got {r.raw('processor.type')!r}")
    r.raw("processor.return_tensors")


def _dataset_task(r: _Reader, part: str) -> None:
    """``<part>_task``: mindformers' ``KeyWordGenDataset`` wrapper around ``<part>`` (the YAML anchor)."""
    task = r.raw(f"{part}_task")
    if task is None:
        return
    kind = r.str(f"{part}_task.type", "KeyWordGenDataset")
    if kind.lower() != "keywordgendataset":
        r.fail(f"{part}_task.type", f"only KeyWordGenDataset (ADGEN prompt/answer) is read, got {kind!r}")
    conf = r.raw(f"{part}_task.dataset_config")
    if conf is not None and conf != r.raw(part):
        r.fail(f"{part}_task.dataset_config", f"must be the {part} mapping (*{part} in mindformers' YAMLs)")


def _eval_callbacks(r: _Reader, ignored: list) -> None:
    cbs = r.raw("eval_callbacks")
    if cbs is None:
        return
    if not isinstance(cbs, list):
        r.fail("eval_callbacks", f"expected a list of callbacks, got {type(cbs).__name__}")
    for i, cb in enumerate(cbs):
        kind = cb.get("type") if isinstance(cb, Mapping) else None
        if str(kind).lower() != "obsmonitor":
            r.fail(f"eval_callbacks[{i}]", f"only ObsMonitor (an upload to OBS on ModelArts) is known, got {kind!r}")
        ignored.append(f"eval_callbacks[{i}] (type 'ObsMonitor': uploads to OBS on ModelArts, not done here)")


def _mindformers_switches(r: _Reader, s: TrainSettings, ignored: list) -> None:
    """mindformers' top-level switches: the ones that would change the numbers are refused unless they are
    off; the rest have no effect on one device (and are named as such)."""
    if r.bool("only_save_strategy", False):
        r.fail("only_save_strategy", "True writes a strategy file and stops in mindformers; not supported")
    if r.bool("auto_trans_ckpt", False):
        r.fail("auto_trans_ckpt", "True reshards load_checkpoint on the fly in mindformers; give a whole "
               "checkpoint (python convert/merge_shards.py) instead")
    r.raw("src_strategy_path_or_dir")
    if r.bool("layer_scale", False):
        r.fail("layer_scale", "True (layer-wise learning-rate decay) is not supported")
    r.raw("layer_decay")      # used by mindformers only with layer_scale: True
    if r.int("micro_batch_interleave_num", 1, lo=1) != 1:
        r.fail("micro_batch_interleave_num", "only 1 is supported (interleaved micro-batches are an Ascend "
               "model-parallel feature)")
    if r.int("moe_config.expert_num", 1, lo=1) != 1:
        r.fail("moe_config.expert_num", "ChatGLM2 has no experts; only 1 is supported")
    for key in ("capacity_factor", "aux_loss_factor", "num_experts_chosen"):
        r.raw(f"moe_config.{key}")       # no effect with one expert
    for key in ("type", "model_name"):
        r.raw(f"trainer.{key}")          # names: the run mode picks what runs
    if not s.use_parallel:
        # with use_parallel: False mindformers applies none of these either
        for key in ("loss_repeated_mean", "enable_alltoall", "full_batch", "search_mode",
                    "enable_parallel_optimizer", "strategy_ckpt_config", "strategy_ckpt_save_file"):
            r.raw(f"parallel.{key}")
        for key in ("expert_parallel", "gradient_aggregation_group"):
            r.raw(f"parallel_config.{key}")


#: families of ignored keys named once together, with why they change nothing here
_FAMILIES = (
    ("context.", ("enable_graph_kernel", "graph_kernel_flags", "max_call_depth", "save_graphs", "save_graphs_path"),
     "graph compiler switches"),
    ("", ("profile", "profile_start_step", "profile_stop_step", "init_start_profile", "profile_communication",
          "profile_memory"), "profiler"),
    ("", ("auto_tune", "filepath_prefix", "autotune_per_step"), "autotune"),
    ("train_dataset.", ("num_parallel_workers", "python_multiprocessing", "numa_enable", "prefetch_size"),
     "data-loader speed"),
    ("eval_dataset.", ("num_parallel_workers", "python_multiprocessing", "numa_enable", "prefetch_size"),
     "data-loader speed"),
)


def _compact(ignored: list) -> list:
    """The ignored keys with each family of :data:`_FAMILIES` named once: ``prefix{a, b} (why)``."""
    out = list(ignored)
    for prefix, keys, why in _FAMILIES:
        found = [k for k in keys if f"{prefix}{k}" in out or f"{prefix}{k} ({why})" in out]
        if len(found) < 2:
            continue
        at = min(i for i, x in enumerate(out) if x.split(" (")[0] in {prefix + k for k in found})
        out = [x for x in out if x.split(" (")[0] not in {prefix + k for k in found}]
        out.insert(at, f"{prefix}{{{', '.join(found)}}} ({why})")
    return out


def _check_seq_length(r: _Reader, s: TrainSettings) -> None:
    """``model.model_config.seq_length`` within the model's own (the ``config.json`` of ``load_checkpoint``, or
    beside a ``.ckpt``): positions beyond what the model was built for are refused."""
    ck = s.load_checkpoint
    if not ck:
        return
    cfg_path = os.path.join(ck, "config.json") if os.path.isdir(ck) else os.path.join(os.path.dirname(ck),
                                                                                         "config.json")
    if not os.path.isfile(cfg_path):
        return
    try:
        model = ChatGLM2Config.from_hf(cfg_path)
    except ConfigError:
        return
    if s.config.seq_length > model.seq_length:
        r.fail("model.model_config.seq_length", f"{s.config.seq_length} is beyond the model's {model.seq_length} "
               f"({cfg_path})")


def settings_from_config(cfg: Mapping, source: str = "config", warn: bool = True) -> TrainSettings:
    """Flatten a mindformers-shaped run mapping into :class:`TrainSettings`; check every value.

    Raises :class:`RunConfigError` (``source: key.path: what is wrong``). Keys that mean nothing here
    land in ``settings.ignored`` and, with ``warn``, in one :class:`RunConfigWarning`.
    """
    r = _Reader(cfg, source)
    ignored: list = []
    mc = r.raw("model.model_config")
    if mc is None:
        raise RunConfigError(f"{source}: model.model_config: missing")
    for key in (mc or {}):
        r.seen.add(f"model.model_config.{key}")
    try:
        config, opts = ChatGLM2Config.from_model_config(mc, source=f"{source}: model.model_config")
    except ConfigError as e:
        raise RunConfigError(str(e)) from None
    ignored.extend(f"model.model_config.{k}" for k in opts.ignored)
    pet_src = "model.model_config.pet_config" if opts.pet_config else "pet_config"
    pet = pet_settings(opts.pet_config or r.raw("pet_config"), source=f"{source}: {pet_src}")
    ignored.extend(k.split(": ", 1)[-1] for k in pet.pop("ignored"))
    if pet["pet_type"] == "ptuning2":
        config = config.replace(pre_seq_len=pet["pre_seq_len"], prefix_projection=pet["prefix_projection"])
    r.raw("model.arch.type")
    s = TrainSettings(config=config, options=opts, pet=pet, source=source)
    s.compute_dtype = opts.compute_dtype
    s.run_mode = r.str("run_mode", "finetune", choices=RUN_MODES).lower()
    s.seed = r.int("seed", 0, lo=0)
    s.output_dir = r.str("output_dir", "./output")
    s.load_checkpoint = r.str("load_checkpoint", "")
    s.resume = r.bool("resume_training", False)
    # context
    mode = r.raw("context.mode", 0)
    names = {"graph_mode": 0, "pynative_mode": 1, "0": 0, "1": 1}
    if str(mode).lower() not in names:
        r.fail("context.mode", f"expected 0 (GRAPH_MODE) or 1 (PYNATIVE_MODE), got {mode!r}")
    s.context_mode = names[str(mode).lower()]
    s.device_target = r.str("context.device_target", "CPU", choices=("cpu", "ascend", "gpu"))
    s.device_target = {"cpu": "CPU", "ascend": "Ascend", "gpu": "GPU"}[s.device_target.lower()]
    s.device_id = r.int("context.device_id", 0, lo=0)
    mem = r.raw("context.max_device_memory", "")
    if mem and not (isinstance(mem, str) and mem.upper().endswith("GB")
                    and mem[:-2].replace(".", "", 1).isdigit()):
        r.fail("context.max_device_memory", f"expected a size like '30GB', got {mem!r}")
    s.max_device_memory = str(mem or "")
    # data
    vocab = [r.raw(f"{k}.vocab_file") for k in ("train_dataset.tokenizer", "processor.tokenizer",
                                                 "eval_dataset.tokenizer")]
    s.vocab_file = str(vocab[0] or vocab[1] or vocab[2] or "")
    r.raw("train_dataset.tokenizer.type"), r.raw("processor.tokenizer.type"), r.raw("eval_dataset.tokenizer.type")
    _special_tokens(r)
    s.train_file = r.str("train_dataset.data_loader.dataset_dir", "")
    s.eval_file = r.str("eval_dataset.data_loader.dataset_dir", "")
    for part in ("train_dataset", "eval_dataset"):
        for key in ("type", "phase", "version", "input_columns"):
            r.raw(f"{part}.data_loader.{key}" if key in ("type", "phase", "version") else f"{part}.{key}")
        if r.int(f"{part}.repeat", 1, lo=1) != 1:
            r.fail(f"{part}.repeat", "only 1 is supported (use runner_config.epochs to go over the data again)")
        for key in ("num_parallel_workers", "python_multiprocessing", "numa_enable", "prefetch_size"):
            if r.raw(f"{part}.{key}") is not None:
                ignored.append(f"{part}.{key}")
        _dataset_task(r, part)
        cols = r.raw(f"{part}.data_loader.origin_columns")
        if cols is not None and list(cols) != ["content", "summary"]:
            r.fail(f"{part}.data_loader.origin_columns", "only ['content', 'summary'] (ADGEN) is read; other "
                   f"formats are detected from the file, got {cols!r}")
    s.data_format = r.raw("train_dataset.data_loader.format")
    s.feature_mode = r.str("train_dataset.data_loader.mode", "official", choices=("official", "rounds"))
    s.padding = r.str("train_dataset.padding", "max_length", choices=("max_length", "longest", "bucket"))
    s.shuffle = r.bool("train_dataset.data_loader.shuffle", True)
    r.raw("eval_dataset.data_loader.shuffle")
    s.data_seed = r.int("train_dataset.seed", s.seed)
    r.raw("eval_dataset.seed")
    s.drop_remainder = r.bool("train_dataset.drop_remainder", True)
    for part in ("train_dataset", "eval_dataset"):
        if not r.bool(f"{part}.ignore_pad_token_for_loss", True):
            r.fail(f"{part}.ignore_pad_token_for_loss", "only True is supported: prompt and padding tokens never "
                   "count in the loss (False would score predictions of the pad id, as mindformers then does)")
    if r.bool("eval_dataset.drop_remainder", False):
        ignored.append("eval_dataset.drop_remainder (every eval sample is evaluated)")
    s.max_source_length = r.int("train_dataset.max_source_length", 64, lo=1)
    s.max_target_length = r.int("train_dataset.max_target_length", 128, lo=1)
    s.eval_max_source_length = r.int("eval_dataset.max_source_length", s.max_source_length, lo=1)
    s.eval_max_target_length = r.int("eval_dataset.max_target_length", s.max_target_length, lo=1)
    s.eval_num_samples = r.int("eval_dataset.num_samples", 0, lo=0)
    s.eval_batch_size = r.int("eval_dataset.batch_size", 8, lo=1)
    s.do_eval = r.bool("do_eval", False) and bool(s.eval_file)
    s.eval_step_interval = r.int("eval_step_interval", -1)
    if s.eval_step_interval == 0 or s.eval_step_interval < -1:
        r.fail("eval_step_interval", f"expected -1 (at the end) or a positive integer, got {s.eval_step_interval}")
    if r.int("eval_epoch_interval", -1) > 0:
        r.fail("eval_epoch_interval", "only -1 is supported (evaluate every eval_step_interval updates)")
    # runner
    s.epochs = r.int("runner_config.epochs", 1, lo=1)
    s.batch_size = r.int("runner_config.batch_size", r.int("train_dataset.batch_size", 1, lo=1), lo=1)
    s.grad_accum = r.int("runner_config.gradient_accumulation_steps", 1, lo=1)
    s.max_steps = r.int("runner_config.max_steps", -1)
    if s.max_steps == 0 or s.max_steps < -1:
        r.fail("runner_config.max_steps", f"expected -1 (all steps) or a positive integer, got {s.max_steps}")
    s.sink_mode = r.bool("runner_config.sink_mode", False)
    s.sink_size = r.int("runner_config.sink_size", 1, lo=1)
    r.raw("runner_wrapper.type")
    s.clip_grad = r.bool("runner_wrapper.use_clip_grad", True)
    s.max_grad_norm = r.float("runner_wrapper.max_grad_norm", 1.0, lo=0, open_lo=True)
    s.max_consecutive_overflows = r.int("runner_wrapper.max_consecutive_overflows", 20, lo=1)
    sense = r.raw("runner_wrapper.scale_sense")
    if isinstance(sense, Mapping):
        kind = r.str("runner_wrapper.scale_sense.type", "DynamicLossScaleUpdateCell",
                     choices=("dynamiclossscaleupdatecell", "fixedlossscaleupdatecell")).lower()
        s.loss_scale_dynamic = kind == "dynamiclossscaleupdatecell"
        s.loss_scale_value = r.float("runner_wrapper.scale_sense.loss_scale_value", 1.0, lo=1.0)
        if s.loss_scale_dynamic:
            s.loss_scale_factor = r.float("runner_wrapper.scale_sense.scale_factor", 2.0, lo=1.0, open_lo=True)
            s.loss_scale_window = r.int("runner_wrapper.scale_sense.scale_window", 1000, lo=1)
    elif sense is not None:
        s.loss_scale_value = r.float("runner_wrapper.scale_sense", 1.0, lo=1.0)
    # schedule and optimizer
    kind = r.str("lr_schedule.type", "polynomial").lower()
    if kind not in SCHEDULES:
        r.fail("lr_schedule.type", f"expected one of linear, cosine, polynomial, constant; got {kind!r}")
    s.schedule = SCHEDULES[kind]
    s.learning_rate = r.float("lr_schedule.learning_rate", r.float("optimizer.learning_rate", 5e-5, lo=0), lo=0)
    s.lr_end = r.float("lr_schedule.lr_end", 0.0, lo=0)
    s.warmup_steps = r.int("lr_schedule.warmup_steps", 0, lo=0)
    s.warmup_ratio = r.float("lr_schedule.warmup_ratio", 0.0, lo=0, hi=1)
    s.total_steps = r.int("lr_schedule.total_steps", -1)
    if s.total_steps == 0 or s.total_steps < -1:
        r.fail("lr_schedule.total_steps", f"expected -1 (all steps) or a positive integer, got {s.total_steps}")
    s.power = r.float("lr_schedule.power", 1.0, lo=0, open_lo=True)
    opt = r.str("optimizer.type", "AdamWeightDecay").lower()
    if opt not in OPTIMIZERS:
        r.fail("optimizer.type", f"only the AdamWeightDecay family and AdamW are supported, got {opt!r}")
    s.optimizer_type, s.bias_correction = opt, opt in BIAS_CORRECTED
    s.beta1 = r.float("optimizer.beta1", 0.9, lo=0, hi=1, open_hi=True)
    s.beta2 = r.float("optimizer.beta2", 0.95, lo=0, hi=1, open_hi=True)
    s.eps = r.float("optimizer.eps", 1e-8, lo=0, open_lo=True)
    s.weight_decay = r.float("optimizer.weight_decay", 0.1, lo=0)
    _callbacks(r, s, ignored)
    _eval_callbacks(r, ignored)
    # parallel
    s.use_parallel = r.bool("use_parallel", False)
    s.parallel_mode = r.int("parallel.parallel_mode", 0, lo=0)
    if s.parallel_mode not in (0, 1):
        r.fail("parallel.parallel_mode", f"expected 0 (data parallel) or 1 (semi-auto), got {s.parallel_mode}")
    s.gradients_mean = r.bool("parallel.gradients_mean", True)
    s.enable_parallel_optimizer = r.bool("parallel.enable_parallel_optimizer", False)
    s.data_parallel = r.int("parallel_config.data_parallel", 1, lo=1)
    s.model_parallel = r.int("parallel_config.model_parallel", 1, lo=1)
    s.pipeline_stage = r.int("parallel_config.pipeline_stage", 1, lo=1)
    s.micro_batch_num = r.int("parallel_config.micro_batch_num", 1, lo=1)
    s.vocab_emb_dp = r.bool("parallel_config.vocab_emb_dp", True)
    from glm_common.metrics import metric_types
    metric = r.raw("metric", {"type": "ADGENMetric"})
    try:
        s.metrics = metric_types(metric if isinstance(metric, list) else r.raw("metric.type", "ADGENMetric"),
                                 f"{source}: metric" if isinstance(metric, list) else f"{source}: metric.type")
    except ValueError as e:
        raise RunConfigError(str(e)) from None
    _mindformers_switches(r, s, ignored)
    s.gradient_checkpointing = r.bool("recompute_config.recompute", False)
    from glm_common.parallel_keys import device_ignored, read_parallel_keys
    s.scaleout = read_parallel_keys(r)
    ignored.extend(device_ignored(s))
    # lr_scale (mindformers' learning_rate_scale): lr x devices x per-device batch / lr_scale_factor
    s.lr_scale = r.bool("lr_scale", False)
    factor = r.float("lr_scale_factor", 256, lo=0, open_lo=True)
    if s.lr_scale:
        devices = s.data_parallel * s.model_parallel * s.pipeline_stage if s.use_parallel else 1
        s.learning_rate = s.learning_rate * devices * r.int("train_dataset.batch_size", s.batch_size, lo=1) / factor
    for key in ("qkv_concat", "mlp_concat"):
        if not getattr(s.options, key):
            r.fail(f"model.model_config.{key}", "only True is supported: the model reads the concatenated layout "
                   "(convert with python convert/hf_to_ms.py --qkv concat --mlp concat)")
    if not s.options.use_past:
        ignored.append("model.model_config.use_past (generation always uses the KV cache: the same tokens)")
    if s.options.batch_size != 1:
        ignored.append("model.model_config.batch_size (eval/predict batches follow eval_dataset.batch_size)")
    unread = r.unread()
    _refuse_unknown(source, unread, sorted(r.seen) + sorted(MINDFORMERS_RUN_IGNORED))
    _check_seq_length(r, s)
    s.ignored = _compact(unread + ignored)
    if warn and s.ignored:
        warnings.warn(f"{source}: keys that mean nothing here, ignored: {', '.join(s.ignored)}",
                      RunConfigWarning, stacklevel=2)
    return s
