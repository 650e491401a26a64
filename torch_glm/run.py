"""Runner: ``python -m torch_glm.run --config RUN.yaml [overrides]`` (also ``python -m torch_glm.train``
and the console command ``glm2-train``): fine-tuning with :func:`torch_glm.train.train`.

The twin of ``mindspore_glm/run.py`` (mindformers' ``run_mindformer.py`` shape, ``glm2-run``); it reads
the same run YAML (:mod:`glm_common.run_config`). Each flag overrides its YAML key.

Before training, rank 0 prints the run's memory plan line (:func:`glm_common.memory_plan.run_plan_line`,
the torch engine: DDP, or FSDP2 full shard with ``parallel.enable_parallel_optimizer``) for the world size
``torchrun`` gives; ``python -m torch_glm.plan`` prints the whole plan.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from glm_common.config import ConfigError
from glm_common.data import DataError
from glm_common.memory_plan import run_plan_line
from glm_common.run_config import RunConfigError, load_run_config, settings_from_config
from glm_common.training import TrainingError
from torch_glm.train import train
from glm_common.cli import one_line_errors

__all__ = ["main"]


@one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="glm2-train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="run YAML (mindformers-shaped)")
    ap.add_argument("--load_checkpoint", help="HF directory of the base weights (overrides the YAML)")
    ap.add_argument("--vocab_file", help="tokenizer.model (overrides the YAML)")
    ap.add_argument("--train_dataset", help="training data file (overrides the YAML)")
    ap.add_argument("--eval_dataset", help="eval data file (overrides the YAML)")
    ap.add_argument("--output_dir", help="output directory (overrides the YAML)")
    ap.add_argument("--max_steps", type=int, help="stop after this many optimizer steps")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch_size", type=int)
    ap.add_argument("--learning_rate", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        raw = load_run_config(args.config)
        s = settings_from_config(raw, source=args.config)
    except (RunConfigError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, attr in (("load_checkpoint", "load_checkpoint"), ("vocab_file", "vocab_file"),
                      ("train_dataset", "train_file"), ("eval_dataset", "eval_file"), ("output_dir", "output_dir"),
                      ("max_steps", "max_steps"), ("epochs", "epochs"), ("batch_size", "batch_size"),
                      ("learning_rate", "learning_rate"), ("seed", "seed")):
        if getattr(args, key) is not None:
            setattr(s, attr, getattr(args, key))
    s.resume = s.resume or args.resume
    s.progress = not args.no_progress
    if os.environ.get("RANK", "0") == "0":
        line = run_plan_line(raw, args.config, int(os.environ.get("WORLD_SIZE", "1")), "torch")
        if line:
            print(line, file=sys.stderr, flush=True)
    try:
        out = train(s, device=args.device)
    except (RunConfigError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in out.items() if k not in ("model", "losses")}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
