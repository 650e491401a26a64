"""Runner: ``python -m mindspore_glm.run --config RUN.yaml --run_mode {train,finetune,eval,predict}``.

The flags are mindformers' ``run_mindformer.py`` ones where they exist; each overrides its YAML key:
``--load_checkpoint`` (an HF directory or a ``.ckpt``; a ``.ckpt`` with only LoRA/prefix weights is put
over the YAML's ``load_checkpoint``), ``--use_parallel``, ``--device_id``, ``--output_dir``,
``--train_dataset_dir``, ``--eval_dataset_dir``, ``--resume_training``, ``--seed``; ``--train_steps``
stops training after N steps; ``--predict_data`` takes texts or one data file.

* ``train`` / ``finetune``: :func:`mindspore_glm.train.train` (loss log, curve, checkpoints).
* ``eval``: the YAML's ``metric.type``: ``ADGENMetric`` (greedy generation over ``eval_dataset``, each
  sample with mindformers' budget, rouge-1/2/l and bleu-4 by the official formula) and/or
  ``PerplexityMetric`` (loss and PPL, also printed as mindformers' log line), :mod:`glm_common.metrics`;
  ``num_samples`` bounds the set; prints the table and writes ``<output_dir>/eval_results.json`` (and
  ``eval_predictions.jsonl``). A ``pet_config`` of LoRA/P-tuning v2 whose weights no loaded checkpoint
  holds is refused in eval and predict (the adapter would be its initial value).
* ``predict``: responses (the model_config's generation settings) printed and written to
  ``<output_dir>/predict_results.jsonl``.

With ``use_parallel`` (``scripts/run_distribute.sh ... eval|predict``) every rank holds the whole model
and answers its own share of the samples or texts (rank ``r`` of ``W`` takes items ``r, r+W, ...``); the
answers are gathered over the ranks (``AllGather``; no shared file system needed) and rank 0 computes the
metrics and writes the files, in the order of the input.

The twin of ``torch_glm/run.py`` (whose command is ``python -m torch_glm.run``, also reachable as
``python -m torch_glm.train``); the console command is ``glm2-run``. Evaluation and prediction are
:mod:`mindspore_glm.evaluate`'s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from glm_common.config import ConfigError
from glm_common.data import DataError, load_samples
from glm_common.fsutil import atomic_file
from glm_common.metrics import metric_log_line
from glm_common.names import is_pet_name, is_train_state, pet_weights_missing
from glm_common.run_config import (RUN_MODES, RunConfigError, TrainSettings, load_run_config, parse_bool,
                                   settings_from_config)
from glm_common.tokenizer import ChatGLM2Tokenizer
from glm_common.training import TrainingError, format_table
from mindspore_glm.checkpointing import is_adapter_checkpoint
from convert.ms_ckpt import MSCheckpoint
from mindspore_glm.evaluate import eval_perplexity, eval_samples, evaluate, predict
from mindspore_glm.launch_plan import launcher_device_id
from mindspore_glm.train import build_model, init_ranks, set_context, train
from glm_common.cli import one_line_errors

__all__ = ["main"]


def _tokenizer(s: TrainSettings):
    if not s.vocab_file:
        raise RunConfigError(f"{s.source}: processor.tokenizer.vocab_file: missing (path to tokenizer.model)")
    if not os.path.isfile(s.vocab_file):
        raise RunConfigError(f"{s.source}: processor.tokenizer.vocab_file: {s.vocab_file}: no such file")
    return ChatGLM2Tokenizer.from_pretrained(s.vocab_file)


#: file names ``--predict_data`` reads as a data file, never as a prompt
_DATA_SUFFIXES = (".json", ".jsonl", ".txt")


def _predict_inputs(items) -> list:
    """Texts, or the queries of one data file (any format of glm_common.data, or plain text lines). One
    item named like a data file (``.json``, ``.jsonl``, ``.txt``, no spaces or newlines) that does not exist is
    an error, not a prompt."""
    if len(items) == 1 and not os.path.isfile(items[0]) and items[0].lower().endswith(_DATA_SUFFIXES) \
            and not any(c.isspace() for c in items[0]):
        what = "a directory, not a data file" if os.path.isdir(items[0]) else "no such file"
        raise RunConfigError(f"--predict_data: {items[0]}: {what} (texts to answer are given as they are; "
                             f"a data file must exist)")
    if len(items) == 1 and os.path.isfile(items[0]):
        path = items[0]
        if path.endswith((".json", ".jsonl")):
            return [smp.query() for smp in load_samples(path)]
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    return list(items)


def _write_json(path: str, obj) -> None:
    with atomic_file(path, encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)


def _write_jsonl(path: str, rows) -> None:
    with atomic_file(path, encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _others_done(rank: int, world: int, n: int, what: str) -> int:
    """A rank other than 0 after a shared eval/predict: say its share (rank 0 writes the files); exit code 0."""
    print(f"rank {rank}: answered {len(range(rank, n, world))} of {n} {what}; rank 0 writes the results",
          file=sys.stderr)
    return 0


def _check_adapter_weights(s: TrainSettings, adapter: str) -> None:
    """Eval/predict with a LoRA/prefix ``pet_config`` need its weights in the loaded checkpoints: without
    them the adapter would be its initial value (LoRA B = 0), i.e. the base model under the fine-tune's name."""
    kind = s.pet["pet_type"]
    if kind not in ("lora", "ptuning2"):
        return
    names, sources = [], []
    for path in (s.load_checkpoint, adapter):
        if path and str(path).endswith(".ckpt") and os.path.isfile(path):
            names.extend(n for n in MSCheckpoint(path).names if not is_train_state(n))
        if path:
            sources.append(path)
    msg = pet_weights_missing(kind, [n for n in names if is_pet_name(n)], sources)
    if msg:
        raise RunConfigError(f"{s.source}: model.model_config.pet_config: {msg}")


@one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mindspore_glm.run", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="run YAML (mindformers-shaped)")
    ap.add_argument("--run_mode", choices=RUN_MODES, help="default: the YAML's run_mode")
    ap.add_argument("--load_checkpoint", help="HF directory or .ckpt (a LoRA/prefix-only .ckpt goes over the "
                                              "YAML's load_checkpoint)")
    ap.add_argument("--use_parallel", help="True|False")
    ap.add_argument("--device_id", type=int)
    ap.add_argument("--predict_data", nargs="+", help="texts, or one data file")
    ap.add_argument("--output_dir")
    ap.add_argument("--train_steps", type=int, help="stop training after this many steps")
    ap.add_argument("--train_dataset_dir")
    ap.add_argument("--eval_dataset_dir")
    ap.add_argument("--resume_training", help="True|False")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = settings_from_config(load_run_config(args.config), source=args.config)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        return _run(s, args)
    except (RunConfigError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # errors of the model, data and training layers are one line already
        if isinstance(e, (TrainingError, DataError, ValueError, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


def _run(s: TrainSettings, args) -> int:
    if args.use_parallel is not None:
        s.use_parallel = parse_bool(args.use_parallel, "--use_parallel")
    if args.resume_training is not None:
        s.resume = parse_bool(args.resume_training, "--resume_training")
    for key, attr in (("output_dir", "output_dir"), ("train_dataset_dir", "train_file"),
                      ("eval_dataset_dir", "eval_file"), ("seed", "seed")):
        if getattr(args, key) is not None:
            setattr(s, attr, getattr(args, key))
    if args.seed is not None:
        s.data_seed = args.seed
    if args.device_id is not None:
        s.device_id = args.device_id
    elif launcher_device_id() is not None:  # a dynamic cluster (msrun): the launcher's device, not the YAML's
        s.device_id = launcher_device_id()
    if args.train_steps is not None:
        if args.train_steps <= 0:
            raise RunConfigError(f"--train_steps: expected a positive integer, got {args.train_steps}")
        s.max_steps = args.train_steps
    s.progress = not args.no_progress
    mode = args.run_mode or s.run_mode
    adapter = ""
    if args.load_checkpoint:
        if is_adapter_checkpoint(args.load_checkpoint):
            adapter = args.load_checkpoint
        else:
            s.load_checkpoint = args.load_checkpoint
    if mode in ("train", "finetune"):
        from mindspore_glm.parallel import check_scaleout
        check_scaleout(s)       # a layout that cannot run stops here, before any device or model
    set_context(s)
    os.makedirs(s.output_dir, exist_ok=True)
    if mode in ("train", "finetune"):
        model, params = build_model(s, adapter)
        out = train(s, model, params)
        print(json.dumps({k: v for k, v in out.items() if k not in ("model", "losses")}, default=str))
        return 0
    texts = _predict_inputs(args.predict_data) if mode == "predict" and args.predict_data else None
    rank, world = init_ranks(s)
    _check_adapter_weights(s, adapter)
    model, _ = build_model(s, adapter)
    model.set_train(False)
    tokenizer = _tokenizer(s)
    if mode == "eval":
        t0 = time.perf_counter()
        samples = eval_samples(s)
        metrics, preds, refs = {}, [], []
        if "ADGENMetric" in s.metrics:
            metrics, preds, refs = evaluate(model, s, tokenizer, rank, world, samples)
        if rank != 0:
            return _others_done(rank, world, len(samples), "samples")
        if "PerplexityMetric" in s.metrics:
            ppl = eval_perplexity(model, s, tokenizer, samples)
            print(metric_log_line("PerplexityMetric", ppl))
            metrics.update(ppl)
        if preds:
            _write_jsonl(os.path.join(s.output_dir, "eval_predictions.jsonl"),
                         ({"prediction": p, "reference": r} for p, r in zip(preds, refs)))
        _write_json(os.path.join(s.output_dir, "eval_results.json"), {**metrics, "num_samples": len(samples)})
        print(format_table(metrics))
        print(f"evaluated {len(samples)} samples in {time.perf_counter() - t0:.1f} s; wrote "
              f"{os.path.join(s.output_dir, 'eval_results.json')}", file=sys.stderr)
        return 0
    if not args.predict_data:
        raise RunConfigError("--predict_data: needed for run_mode predict (texts or a data file)")
    rows = predict(model, s, tokenizer, texts, rank, world)
    if rank != 0:
        return _others_done(rank, world, len(rows), "texts")
    for r in rows:
        print(f"{r['query']}\n-> {r['response']}\n")
    path = os.path.join(s.output_dir, "predict_results.jsonl")
    _write_jsonl(path, rows)
    print(f"wrote {len(rows)} responses to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
