"""mindformers' scale-out keys of a run YAML, read and checked without a backend.

:func:`read_parallel_keys` reads what :mod:`glm_common.run_config` does not flatten itself, returning a
plain mapping (``TrainSettings.scaleout``) that ``mindspore_glm.parallel`` turns into MindSpore's
auto-parallel context, sharding strategies, pipeline stages and recompute flags:

* ``parallel``: ``full_batch``, ``search_mode``, ``loss_repeated_mean``, ``enable_parallel_optimizer``,
  ``parallel_optimizer_config.{gradient_accumulation_shard, parallel_optimizer_threshold,
  optimizer_weight_shard_size}``, ``strategy_ckpt_save_file`` / ``strategy_ckpt_config.{save_file,
  only_trainable_params}``;
* ``parallel_config.gradient_aggregation_group`` (the optimizer's communication fusion groups, as
  mindformers' layer settings use it);
* ``recompute_config``: ``recompute``, ``mp_comm_recompute``, ``parallel_optimizer_comm_recompute``,
  ``recompute_slice_activation``, ``select_recompute`` (``True``: attention and the MLP of every
  layer; or a list of names of a layer's cells, regular expressions matched whole, e.g. ``["mlp"]``, each
  of which must match a cell; used when ``recompute`` is False).

Keys that have no meaning for this model (``enable_alltoall``, ``expert_parallel``) are left unread, so
they land in the run's one "ignored" warning.
"""
from __future__ import annotations

__all__ = ["SEARCH_MODES", "SELECT_RECOMPUTE_DEFAULT", "read_parallel_keys", "device_ignored", "layer_stages"]


def layer_stages(num_layers: int, pipeline_stage: int) -> list:
    """The pipeline stage of each layer, as mindformers assigns them (``(layers + 1) // stages`` layers a
    stage, the rest on the last): the embedding is on stage 0, the final norm and ``output_layer`` on the
    last. The runner (``mindspore_glm.parallel``) and the memory plan both use it."""
    per = max((num_layers + 1) // pipeline_stage, 1)
    return [min(i // per, pipeline_stage - 1) for i in range(num_layers)]

#: MindSpore's ``search_mode`` values (auto parallel only; named in the "ignored" warning: semi-auto uses
#: only the strategies given)
SEARCH_MODES = ("recursive_programming", "sharding_propagation", "dynamic_programming")
#: the cells of a layer ``select_recompute: True`` recomputes: attention and the MLP, as mindformers'
#: ``select_recompute`` does (its attention scores/softmax and the SwiGLU activation are the selected ops;
#: here the two cells around them)
SELECT_RECOMPUTE_DEFAULT = ("self_attention", "mlp")


def _select_recompute(r) -> tuple:
    import re
    raw = r.raw("recompute_config.select_recompute", False)
    if raw is None or raw is False:
        return ()
    if raw is True:
        return SELECT_RECOMPUTE_DEFAULT
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not raw or not all(isinstance(x, str) and x for x in raw):
        r.fail("recompute_config.select_recompute", f"expected True/False or a list of cell names of a layer "
                                                    f"(e.g. [mlp]), got {raw!r}")
    for x in raw:
        try:
            re.compile(x)
        except re.error as e:
            r.fail("recompute_config.select_recompute", f"{x!r} is not a regular expression ({e})")
    return tuple(raw)


def read_parallel_keys(r) -> dict:
    """The scale-out keys of the run mapping behind ``r`` (a ``glm_common.run_config._Reader``, which marks
    them read). Bad values raise ``RunConfigError`` naming the key."""
    out = {
        "full_batch": r.bool("parallel.full_batch", False),
        "search_mode": r.str("parallel.search_mode", "sharding_propagation", choices=SEARCH_MODES).lower(),
        "loss_repeated_mean": r.bool("parallel.loss_repeated_mean", True),
        "enable_parallel_optimizer": r.bool("parallel.enable_parallel_optimizer", False),
        "gradient_accumulation_shard": r.bool("parallel.parallel_optimizer_config.gradient_accumulation_shard",
                                              False),
        "parallel_optimizer_threshold": r.int("parallel.parallel_optimizer_config.parallel_optimizer_threshold",
                                              64, lo=0),
        "optimizer_weight_shard_size": r.int("parallel.parallel_optimizer_config.optimizer_weight_shard_size",
                                             -1, lo=-1),
        "gradient_aggregation_group": r.int("parallel_config.gradient_aggregation_group", 4, lo=1),
        "only_trainable_params": r.bool("parallel.strategy_ckpt_config.only_trainable_params", True),
    }
    save = r.raw("parallel.strategy_ckpt_config.save_file", None)
    legacy = r.raw("parallel.strategy_ckpt_save_file", None)
    out["strategy_ckpt_save_file"] = str(save or legacy or "")
    if out["optimizer_weight_shard_size"] == 0:
        r.fail("parallel.parallel_optimizer_config.optimizer_weight_shard_size",
               "expected -1 (all data-parallel ranks) or a positive integer, got 0")
    out["recompute"] = {
        "recompute": r.bool("recompute_config.recompute", False),
        "mp_comm_recompute": r.bool("recompute_config.mp_comm_recompute", True),
        "parallel_optimizer_comm_recompute": r.bool("recompute_config.parallel_optimizer_comm_recompute", False),
        "recompute_slice_activation": r.bool("recompute_config.recompute_slice_activation", False),
        "select_recompute": _select_recompute(r),
    }
    return out


def device_ignored(s) -> list:
    """Keys that only act on Ascend, named (with why) for the run's "ignored" warning on CPU/GPU; and
    ``parallel.search_mode``, which MindSpore reads only in auto-parallel mode (``parallel_mode: 2``, not
    offered): in semi-auto the operators take ``parallel_config``'s strategies and the others MindSpore's
    default, the batch split over every device."""
    out = []
    if s.use_parallel and getattr(s, "scaleout", None) and "search_mode" in s.scaleout:
        out.append(f"parallel.search_mode (MindSpore reads it only in auto-parallel mode, parallel_mode 2, which is "
                   f"not offered; semi-auto takes parallel_config's strategies)")
    if s.device_target == "Ascend":
        return out
    if getattr(s.options, "use_flash_attention", False):
        out.append("model.model_config.use_flash_attention (fused attention is an Ascend kernel; no effect on "
                   f"{s.device_target})")
    if s.scaleout.get("enable_parallel_optimizer") and s.use_parallel:
        out.append(f"parallel.enable_parallel_optimizer (MindSpore's optimizer shard runs only on Ascend; no effect "
                   f"on {s.device_target} in mindspore_glm; torch_glm shards with FSDP2 under torchrun)")
    return out
