"""What the two training loops (``mindspore_glm.train``, ``torch_glm.train``) and their evaluation compute
alike, from the run settings (:class:`glm_common.run_config.TrainSettings`): the training features (the
YAML's ``data_format``, ``feature_mode``, lengths), the batch-source arguments (``padding``, shuffling,
sharding), the step budget, the eval samples, prompts and token budget, and the answer clean-up.

Backend-free (numpy); both backends call these, so the same YAML gives the same batches and the same
eval set in both.
"""
from __future__ import annotations

import os

import numpy as np

from glm_common.data import build_eval_features, build_train_features, load_samples
from glm_common.fsutil import OutputError, check_output
from glm_common.generation import GenerationPlan, budget_groups, plan_eval_prompts
from glm_common.run_config import RunConfigError, TrainSettings

__all__ = ["TrainingError", "OverflowStreak", "check_output_dir", "loss_rank", "train_features", "dataset_kwargs", "updates_per_epoch", "total_updates", "eval_samples",
           "eval_loss_features", "eval_prompts", "generation_groups", "clean_answer", "merge_shards", "format_table"]


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN/Inf loss under a fixed loss scale, ...); one line with the step."""


class OverflowStreak:
    """Counts updates that overflowed in a row (MindSpore: skipped by the dynamic loss scale; torch: a
    non-finite loss or gradient); :meth:`update` raises :class:`TrainingError` when ``limit`` of them
    (``runner_wrapper.max_consecutive_overflows``, default 20) come in a row: a run whose every update
    overflows (a stuck loss scale) stops with one line instead of logging nothing but skips."""

    def __init__(self, limit: int):
        self.limit, self.count = int(limit), 0

    def update(self, step: int, overflow: bool, loss_scale: "float | None" = None) -> None:
        self.count = self.count + 1 if overflow else 0
        if self.count >= self.limit:
            at = f" (loss scale {loss_scale:g})" if loss_scale is not None else ""
            raise TrainingError(f"step {step}: {self.count} consecutive updates overflowed{at}; stopping (the "
                                f"loss scale is stuck or the weights are not finite; runner_wrapper."
                                f"max_consecutive_overflows: {self.limit})")


def check_output_dir(s: TrainSettings) -> str:
    """Refuse an ``output_dir`` that is, contains or lies inside the run's data files, tokenizer or
    ``load_checkpoint`` (a checkpoint under ``<output_dir>/checkpoint`` is the run's own, for resuming);
    :class:`glm_common.fsutil.OutputError` naming ``output_dir``. Returns its absolute path."""
    own = os.path.realpath(os.path.join(s.output_dir, "checkpoint"))
    ckpt = s.load_checkpoint
    if ckpt and os.path.realpath(ckpt).startswith(own + os.sep):
        ckpt = ""
    inputs = [s.train_file, s.eval_file, s.vocab_file, ckpt]
    out = check_output(s.output_dir, inputs, f"{s.source}: output_dir", contains=False)
    written = [os.path.join(out, n) for n in ("loss_log.jsonl", "loss_curve.png", "checkpoint", "strategy", "adapter",
                                              "prefix", "model", "eval_results.json", "predict_results.jsonl")]
    for inp in filter(None, inputs):
        real = os.path.realpath(inp)
        for w in written:
            if real == os.path.realpath(w) or real.startswith(os.path.realpath(w) + os.sep):
                raise OutputError(f"{s.output_dir}: {s.source}: output_dir: the run writes {w}, which holds the "
                                  f"input {inp}")
    return out


def loss_rank(world: int, pipeline_stage: int = 1) -> int:
    """The rank whose step loss is the run's (it writes the loss log and the summary): 0, or with
    ``pipeline_stage`` stages the first rank of the last stage. MindSpore returns the training loss only on
    the last stage, and gives ranks to stages in order, ``world / pipeline_stage`` a stage."""
    if pipeline_stage <= 1:
        return 0
    return world - world // pipeline_stage


def train_features(s: TrainSettings, tokenizer, progress: bool = False) -> dict:
    """Token features of the training file, read in the YAML's ``data_format`` and built in its
    ``feature_mode`` with ``max_source_length``/``max_target_length``; checked against ``seq_length``."""
    if not s.train_file:
        raise RunConfigError(f"{s.source}: train_dataset.data_loader.dataset_dir: missing (path to the training data)")
    feats = build_train_features(load_samples(s.train_file, s.data_format), tokenizer, mode=s.feature_mode,
                                 max_source_length=s.max_source_length, max_target_length=s.max_target_length,
                                 progress=progress)
    if feats["input_ids"].shape[1] > s.config.seq_length:
        raise RunConfigError(f"{s.source}: model.model_config.seq_length: {s.config.seq_length} is less than "
                             f"max_source_length + max_target_length + 1 = {feats['input_ids'].shape[1]}")
    return feats


def dataset_kwargs(s: TrainSettings, rank: int = 0, world_size: int = 1) -> dict:
    """Keyword arguments of ``make_dataset`` (either backend) after ``features, batch_size``: shuffling,
    the data seed, this rank's shard, ``drop_remainder`` and the YAML's ``padding``."""
    return dict(shuffle=s.shuffle, seed=s.data_seed, rank=rank, world_size=world_size,
                drop_remainder=s.drop_remainder, padding=s.padding)


def updates_per_epoch(s: TrainSettings, batches: int) -> int:
    """Optimizer updates in an epoch of ``batches`` micro-batches (``gradient_accumulation_steps`` each)."""
    per_epoch = batches // s.grad_accum
    if per_epoch == 0:
        raise RunConfigError(f"{s.source}: runner_config.gradient_accumulation_steps: {s.grad_accum} is more than "
                             f"the {batches} batches of an epoch")
    return per_epoch


def total_updates(s: TrainSettings, per_epoch: int) -> int:
    """Updates the run makes: ``epochs`` epochs, capped by ``max_steps`` when that is positive."""
    total = per_epoch * s.epochs
    return total if s.max_steps <= 0 else min(total, s.max_steps)


def eval_samples(s: TrainSettings) -> list:
    """The eval file's samples (in the YAML's ``data_format``), the first ``eval_dataset.num_samples`` of
    them when that is set."""
    if not s.eval_file:
        raise RunConfigError(f"{s.source}: eval_dataset.data_loader.dataset_dir: missing (path to the eval data)")
    samples = load_samples(s.eval_file, s.data_format)
    return samples[:s.eval_num_samples] if s.eval_num_samples else samples


def eval_loss_features(s: TrainSettings, tokenizer, samples) -> dict:
    """Teacher-forced features of the eval samples (``feature_mode``, the eval lengths), cut to the model's
    ``seq_length`` where the eval lengths add up to more (the shipped P-tuning v2 YAML: 128 + 128 eval
    tokens, ``seq_length`` 193): the loss is then over the label tokens inside the model's window."""
    feats = build_train_features(samples, tokenizer, mode=s.feature_mode, max_source_length=s.eval_max_source_length,
                                 max_target_length=s.eval_max_target_length)
    limit = int(s.config.seq_length)
    if feats["input_ids"].shape[1] > limit:
        feats = dict(feats)
        for key in ("input_ids", "labels"):
            feats[key] = np.ascontiguousarray(feats[key][:, :limit])
        if "lengths" in feats:
            feats["lengths"] = np.minimum(feats["lengths"], limit)
    return feats


def eval_prompts(s: TrainSettings, tokenizer, samples, report=None) -> tuple:
    """``(eval features, plan)``: left-padded prompts of the eval samples and each sample's new-token
    budget, as mindformers' generator gives it (:func:`glm_common.generation.plan_eval_prompts`: prompt
    plus answer within ``min(max_decode_length, seq_length)``, at most the eval ``max_target_length`` new
    tokens). ``report`` (e.g. a warning printer) gets the one line about prompts cut to fit."""
    ev = build_eval_features(samples, tokenizer, mode=s.feature_mode, max_source_length=s.eval_max_source_length)
    try:
        return plan_eval_prompts(ev, s.config.seq_length, s.options.max_decode_length, tokenizer.pad_token_id,
                                 report=report, max_new_tokens=s.eval_max_target_length)
    except ValueError as e:
        raise RunConfigError(f"{s.source}: model.model_config: {e}") from None


def generation_groups(plan: GenerationPlan, rows, seq_length: int) -> list:
    """The eval batch ``rows`` (indices into the eval set) split into groups generated together:
    ``[(row indices, new tokens), ...]`` (:func:`glm_common.generation.budget_groups`); keep
    ``plan.new_tokens[r]`` tokens of row ``r``'s answer."""
    rows = np.asarray(rows, dtype=np.int64)
    return [(rows[idx], int(new)) for idx, new in budget_groups(plan.lengths[rows], plan.new_tokens[rows], seq_length)]


def clean_answer(tokenizer, row) -> list:
    """Generated ids up to the first eos, pads dropped."""
    out = []
    for t in row:
        if t == tokenizer.eos_token_id:
            break
        if t != tokenizer.pad_token_id:
            out.append(int(t))
    return out


def merge_shards(parts: list, n: int) -> list:
    """Rank ``r``'s answers for items ``r, r+W, ...`` -> all ``n`` answers in item order."""
    out = [None] * n
    for r, part in enumerate(parts):
        out[r::len(parts)] = part
    return out


def format_table(metrics: dict) -> str:
    """The metrics as a two-line Markdown table."""
    keys = list(metrics)
    return "| " + " | ".join(keys) + " |\n| " + " | ".join("---" for _ in keys) + " |\n| " + \
        " | ".join(f"{metrics[k]:.4f}" for k in keys) + " |"


def label_tokens(labels: np.ndarray) -> int:
    """Label tokens the shifted loss counts in ``labels [B, S]`` (``labels[:, 1:] != -100``)."""
    return int((np.asarray(labels)[:, 1:] != -100).sum())


__all__ += ["label_tokens"]
