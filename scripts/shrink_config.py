"""Shrink a mindformers glm2 run YAML to the tiny model: change only the model sizes and the paths.

    python scripts/shrink_config.py configs/glm2/run_glm2_6b_lora.yaml configs/tiny/mindformers/run_glm2_6b_lora.yaml

What changes, and nothing else:

* the model sizes in ``model.model_config`` (``num_layers``, ``hidden_size``, ``ffn_hidden_size``,
  ``kv_channels``, ``num_attention_heads``, ``multi_query_group_num``, ``padded_vocab_size``) become the
  tiny model's (``--model``, an HF directory; default the golden tiny ChatGLM2 in ``tests/fixtures``);
* the paths: ``load_checkpoint`` (``--checkpoint``, default the tiny model directory), every
  ``tokenizer.vocab_file`` (``--vocab``), every ``data_loader.dataset_dir`` (``--data``: a directory
  holding ``train.json`` and ``dev.json``; a path ending in ``dev.json`` points at the dev file, any
  other at the train file), ``output_dir`` (``--output-dir``);
* the device: ``context.device_target`` (``--device-target``, default CPU), which is where the run
  happens rather than what it computes.

Sequence lengths, batch sizes, dtypes, schedules, metrics and every other key are kept, so the shrunk
YAML runs the published config's recipe at test scale. Comments are not kept (PyYAML rewrites the
mapping; the anchors of ``*_dataset_task`` are kept as anchors). With ``--paths relative`` the paths are
written relative to the repository root (for YAMLs shipped in the repository).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
             "multi_query_group_num", "padded_vocab_size")
DEFAULT_MODEL = os.path.join(ROOT, "tests", "fixtures", "model", "tiny_glm2")
DEFAULT_VOCAB = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "tiny_glm2_sp.model")
DEFAULT_DATA = os.path.join(ROOT, "tests", "fixtures", "data", "adgen")


class ShrinkError(ValueError):
    """A YAML or model directory that cannot be shrunk; one line naming the file."""


def _walk(node, path=""):
    """Every (dotted path, parent mapping, key) of a nested mapping/list."""
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{path}.{k}" if path else str(k)
            yield p, node, k
            yield from _walk(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def shrink(cfg: dict, model_dir: str = DEFAULT_MODEL, vocab: str = DEFAULT_VOCAB, data: str = DEFAULT_DATA,
           checkpoint: str | None = None, output_dir: str | None = None, device_target: str = "CPU",
           source: str = "config") -> dict:
    """Return ``cfg`` (a parsed run YAML, changed in place) with the tiny sizes and the given paths."""
    cfg_path = os.path.join(model_dir, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            tiny = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ShrinkError(f"{cfg_path}: cannot read the model's config.json ({e})") from None
    mc = (cfg.get("model") or {}).get("model_config")
    if not isinstance(mc, dict):
        raise ShrinkError(f"{source}: model.model_config: missing")
    for key in SIZE_KEYS:
        if key not in tiny:
            raise ShrinkError(f"{cfg_path}: {key}: missing")
        mc[key] = tiny[key]
    cfg["load_checkpoint"] = checkpoint or model_dir
    if output_dir is not None:
        cfg["output_dir"] = output_dir
    cfg.setdefault("context", {})["device_target"] = device_target
    for path, parent, key in list(_walk(cfg)):
        if key == "vocab_file":
            parent[key] = vocab
        elif key == "dataset_dir":
            name = "dev.json" if str(parent[key]).rstrip("/").endswith("dev.json") else "train.json"
            parent[key] = os.path.join(data, name)
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/shrink_config.py", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[4:]))
    ap.add_argument("config", help="a mindformers glm2 run YAML (e.g. configs/glm2/run_glm2_6b_lora.yaml)")
    ap.add_argument("output", help="where to write the shrunk YAML")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF directory of the small model (sizes from its "
                                                          "config.json); default: %(default)s")
    ap.add_argument("--checkpoint", help="load_checkpoint (default: --model)")
    ap.add_argument("--vocab", default=DEFAULT_VOCAB, help="tokenizer.model; default: %(default)s")
    ap.add_argument("--data", default=DEFAULT_DATA, help="directory with train.json and dev.json; default: %(default)s")
    ap.add_argument("--output-dir", help="output_dir of the run (default: kept)")
    ap.add_argument("--device-target", default="CPU", choices=("CPU", "GPU", "Ascend"))
    ap.add_argument("--paths", choices=("absolute", "relative"), default="absolute",
                    help="write paths relative to the repository root (for YAMLs kept in the repository)")
    args = ap.parse_args(argv)
    import yaml
    try:
        with open(args.config, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        if not isinstance(cfg, dict):
            raise ShrinkError(f"{args.config}: expected a mapping at the top level")
        paths = [args.model, args.checkpoint, args.vocab, args.data]
        if args.paths == "relative":
            paths = [os.path.relpath(os.path.abspath(p), ROOT) if p else p for p in paths]
        cfg = shrink(cfg, args.model, paths[2], paths[3], checkpoint=paths[1] or paths[0],
                     output_dir=args.output_dir, device_target=args.device_target, source=args.config)
    except (OSError, yaml.YAMLError, ShrinkError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from glm_common.fsutil import OutputError, atomic_file
    head = (f"# {os.path.basename(args.config)} shrunk by scripts/shrink_config.py: tiny model sizes, paths and "
            f"device changed, every other key as published.\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    try:
        with atomic_file(args.output, encoding="utf-8") as f:
            f.write(head)
            yaml.safe_dump(cfg, f, allow_unicode=True, sort_keys=False, default_flow_style=None, width=120)
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
