"""The fault matrix: bad inputs and faults against the project's tools, each a ``case_*`` function that
builds its bad input in a fresh folder and returns what to run and how to judge it
(``tests/faults/test_faults.py`` runs each as one pytest case, marker ``faults``;
``python scripts/fault_matrix.py`` runs ``pytest -m faults`` and prints the matrix).

Every case is classified by one of three rules, chosen by what the case returns:

- :class:`Run` (bad input: converters, merger, data CLI, run YAML, rank tables) is *refused cleanly* when:
  a non-zero exit status, exactly one line on stderr, no Python traceback, the line names the file the case
  is about (input or output, whichever is wrong), and nothing half-written left behind (no ``*.partial`` /
  ``*.old`` / ``.tmp_*`` anywhere in the case folder, none of the case's outputs);
- :class:`Expect` (a fault the tool must get past: resume over a damaged checkpoint, a planted pickle, a
  cut loss-log line) is *handled* when: the documented exit status, every expected line on stderr (each
  names the file or checkpoint it is about), no Python traceback, and none of the files that must not
  appear (the pickle's marker) exists;
- :class:`Checked` (the launcher's bad arguments of ``tests/faults/launch_cases.py``, run for real with a
  stand-in rank worker) carries the verdict of that module's own rule: exit 2 with an ``error:`` line,
  nothing started. The launcher's process faults (a crashing rank, SIGTERM, kill -9 of the launcher, ...)
  are the ``faults``-marked tests of ``tests/scripts/test_run_distribute.py``: in the matrix, run once.

Anything else is *wrong*.

Which backend: the resume cases run ``torch_glm`` (``python -m torch_glm.run``) on the tiny model, 16 rows,
LoRA, a checkpoint after each of 4 steps (one run shared by the cases, then each resumes a copy); the
MindSpore twin has the same checks in ``tests/mindspore_glm/test_resume.py``. The case of ranks whose
latest steps disagree verifies two real rank checkpoint directories with ``torch_glm.resume`` and agrees on
a step with ``glm_common.resume.choose_resume`` (the gather over ranks given both payloads, no process
group); the 2-process run is the slow test in ``tests/torch_glm/test_resume.py``.

A disk-full and a read-only-output case run inside ``unshare -rm`` with a small tmpfs mounted; where user
namespaces are unavailable they are skipped and say so.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
QKV0 = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
QKV1 = "transformer.encoder.layers.1.self_attention.query_key_value.weight"


@dataclass
class Run:
    """One command of a case: ``names`` must appear in the error line; ``outputs`` must not exist after."""

    cmd: list
    names: list
    outputs: list = field(default_factory=list)
    unshare_mount: Optional[tuple[str, str]] = None  # (folder, tmpfs options) mounted for the command
    timeout: float = 300


@dataclass
class Expect:
    """A fault the command must get past: exit ``rc``, every string of ``lines`` on stderr, no traceback, and
    none of ``absent`` exists afterwards."""

    cmd: list
    lines: list
    absent: list = field(default_factory=list)
    rc: int = 0
    timeout: float = 300


@dataclass
class Checked:
    """A case that ran and judged itself (the launcher cases): ``ok``, ``why``, and ``label`` for the line."""

    ok: bool
    why: str
    label: str = "handled"


class Skip(Exception):
    """A case that cannot run here (the reason is printed)."""


# ---------------------------------------------------------------------- shared inputs, built once
class Context:
    def __init__(self, base: str):
        self.base = base
        self._cache: dict[str, str] = {}

    def _once(self, key: str, build: Callable[[str], None]) -> str:
        if key not in self._cache:
            path = os.path.join(self.base, "_shared", key)
            build(path)
            self._cache[key] = path
        return self._cache[key]

    def hf(self, layout: str = "single") -> str:
        from convert.hf_layout import write_tiny_hf_dir
        return self._once(f"hf-{layout}", lambda p: write_tiny_hf_dir(p, layout))

    def ms_ckpt(self) -> str:
        def build(p):
            from convert.hf_to_ms import convert_hf_to_ms
            os.makedirs(p)
            convert_hf_to_ms(self.hf(), os.path.join(p, "tiny.ckpt"), progress=False)
        return os.path.join(self._once("ms", build), "tiny.ckpt")

    def torch_run(self) -> str:
        """A finished 4-step tiny LoRA run of torch_glm (``run.yaml``, ``out/`` with ``tiny_step_1..4``)."""
        def build(p):
            from pathlib import Path
            import yaml
            from tests.torch_glm.test_train import run_config
            cfg = run_config(Path(p), "lora", 5e-3, rows=16, epochs=1, callbacks=[
                {"type": "CheckpointMonitor", "prefix": "tiny", "save_checkpoint_steps": 1,
                 "keep_checkpoint_max": 10}])
            with open(os.path.join(p, "run.yaml"), "w", encoding="utf-8") as f:
                yaml.safe_dump(cfg, f, allow_unicode=True)
            res = subprocess.run(torch_train(p, os.path.join(p, "out")), capture_output=True, text=True,
                                 env=_env(), timeout=600)
            if res.returncode:
                raise RuntimeError(f"the tiny torch_glm run failed: {res.stderr[-2000:]}")
        return self._once("torch-run", build)

    def launch_tmp(self) -> str:
        return self._once("launch", lambda p: os.makedirs(p))

    def copy_hf(self, d: str, layout: str = "single") -> str:
        dst = os.path.join(d, "hf")
        shutil.copytree(self.hf(layout), dst)
        return dst

    def copy_ckpt(self, d: str) -> str:
        dst = os.path.join(d, "in.ckpt")
        shutil.copy(self.ms_ckpt(), dst)
        return dst


def _script(rel: str) -> str:
    return os.path.join(ROOT, rel)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def torch_train(run_dir: str, out: str, *extra) -> list:
    return [PY, "-m", "torch_glm.run", "--config", os.path.join(run_dir, "run.yaml"), "--output_dir", out,
            "--device", "cpu", "--no_progress", *extra]


def hf_to_ms(hf_dir: str, out: str, *extra) -> list:
    return [PY, _script("convert/hf_to_ms.py"), "--hf-dir", hf_dir, "--output", out, "--no-progress", *extra]


def ms_to_hf(ckpt: str, out: str, config: Optional[str] = None, *extra) -> list:
    return [PY, _script("convert/ms_to_hf.py"), "--ckpt", ckpt, "--config",
            config or os.path.join(ROOT, "tests", "fixtures", "model", "tiny_glm2"), "--output", out,
            "--no-progress", *extra]


def merge(src: str, out: str, *extra) -> list:
    return [PY, _script("convert/merge_shards.py"), "--src", src, "--output", out, "--quiet", *extra]


def _st_rewrite(path: str, mutate) -> None:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header = mutate(header)
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def _st_case(ctx, d, mutate, *names) -> Run:
    hf = ctx.copy_hf(d)
    _st_rewrite(os.path.join(hf, "model.safetensors"), mutate)
    out = os.path.join(d, "out.ckpt")
    return Run(hf_to_ms(hf, out), ["model.safetensors", *names], [out])


# ---------------------------------------------------------------------- converters: HF -> MindSpore
def case_hf_dir_missing(ctx, d):
    return Run(hf_to_ms(os.path.join(d, "nope"), os.path.join(d, "o.ckpt")), ["nope"], [os.path.join(d, "o.ckpt")])


def case_hf_dir_is_a_file(ctx, d):
    p = os.path.join(d, "file")
    open(p, "w").write("x")
    return Run(hf_to_ms(p, os.path.join(d, "o.ckpt")), ["file"], [os.path.join(d, "o.ckpt")])


def case_hf_dir_without_weights(ctx, d):
    hf = ctx.copy_hf(d)
    os.remove(os.path.join(hf, "model.safetensors"))
    return Run(hf_to_ms(hf, os.path.join(d, "o.ckpt")), ["hf"], [os.path.join(d, "o.ckpt")])


def _set(name, key, value):
    def mutate(h):
        h[name][key] = value
        return h
    return mutate


def case_st_negative_offsets(ctx, d):
    return _st_case(ctx, d, lambda h: (h[QKV0]["data_offsets"].__setitem__(0, -8), h)[1], QKV0)


def case_st_overlapping_offsets(ctx, d):
    return _st_case(ctx, d, lambda h: (h[QKV1].__setitem__("data_offsets", list(h[QKV0]["data_offsets"])), h)[1])


def case_st_shifted_offsets(ctx, d):
    def mutate(h):
        for k, v in h.items():
            if k != "__metadata__":
                v["data_offsets"] = [v["data_offsets"][0] + 4, v["data_offsets"][1] + 4]
        return h
    return _st_case(ctx, d, mutate)


def case_st_entry_without_offsets(ctx, d):
    return _st_case(ctx, d, lambda h: (h[QKV0].pop("data_offsets"), h)[1], QKV0)


def case_st_header_is_a_list(ctx, d):
    return _st_case(ctx, d, lambda h: b"[1, 2]")


def case_st_header_not_json(ctx, d):
    return _st_case(ctx, d, lambda h: b"{not json")


def case_st_unknown_dtype(ctx, d):
    return _st_case(ctx, d, _set(QKV0, "dtype", "F12"), QKV0)


def case_st_shape_bytes_mismatch(ctx, d):
    return _st_case(ctx, d, lambda h: (h[QKV0]["shape"].__setitem__(0, h[QKV0]["shape"][0] - 1), h)[1], QKV0)


def case_st_shape_not_integers(ctx, d):
    return _st_case(ctx, d, _set(QKV0, "shape", ["a", 2]), QKV0)


def case_st_truncated(ctx, d):
    hf = ctx.copy_hf(d)
    p = os.path.join(hf, "model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    return Run(hf_to_ms(hf, os.path.join(d, "o.ckpt")), ["model.safetensors"], [os.path.join(d, "o.ckpt")])


def case_st_huge_header_length(ctx, d):
    hf = ctx.copy_hf(d)
    p = os.path.join(hf, "model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(struct.pack("<Q", 2 ** 40) + data[8:])
    return Run(hf_to_ms(hf, os.path.join(d, "o.ckpt")), ["model.safetensors"], [os.path.join(d, "o.ckpt")])


def case_st_empty_file(ctx, d):
    hf = ctx.copy_hf(d)
    open(os.path.join(hf, "model.safetensors"), "wb").close()
    return Run(hf_to_ms(hf, os.path.join(d, "o.ckpt")), ["model.safetensors"], [os.path.join(d, "o.ckpt")])


def _index_case(ctx, d, mutate, *names):
    hf = ctx.copy_hf(d, "sharded-safetensors")
    p = os.path.join(hf, "model.safetensors.index.json")
    data = json.load(open(p))
    text = mutate(data, hf)
    open(p, "w").write(text if isinstance(text, str) else json.dumps(data))
    out = os.path.join(d, "o.ckpt")
    return Run(hf_to_ms(hf, out), ["model.safetensors.index.json", *names], [out])


def case_index_not_json(ctx, d):
    return _index_case(ctx, d, lambda data, hf: "{ nope")


def case_index_value_not_a_string(ctx, d):
    return _index_case(ctx, d, lambda data, hf: data["weight_map"].__setitem__(QKV0, 3), QKV0)


def case_index_without_weight_map(ctx, d):
    return _index_case(ctx, d, lambda data, hf: data.pop("weight_map"), "weight_map")


def case_index_shard_missing(ctx, d):
    def mutate(data, hf):
        data["weight_map"][QKV0] = "model-00009-of-00009.safetensors"
    return _index_case(ctx, d, mutate, "model-00009-of-00009.safetensors")


def case_index_climbs_out(ctx, d):
    def mutate(data, hf):
        shard = data["weight_map"][QKV0]
        os.makedirs(os.path.join(d, "elsewhere"), exist_ok=True)
        shutil.copy(os.path.join(hf, shard), os.path.join(d, "elsewhere", "x.safetensors"))
        for k, v in list(data["weight_map"].items()):
            if v == shard:
                data["weight_map"][k] = "../elsewhere/x.safetensors"
    return _index_case(ctx, d, mutate, "outside")


def case_index_absolute_path(ctx, d):
    def mutate(data, hf):
        data["weight_map"][QKV0] = os.path.join(hf, data["weight_map"][QKV0])
    return _index_case(ctx, d, mutate, QKV0)


def case_bin_not_a_state_dict(ctx, d):
    import torch
    hf = ctx.copy_hf(d, "single-bin")
    p = os.path.join(hf, "pytorch_model.bin")
    torch.save([1, 2, 3], p)
    return Run(hf_to_ms(hf, os.path.join(d, "o.ckpt")), ["pytorch_model.bin"], [os.path.join(d, "o.ckpt")])


def case_bin_value_not_a_tensor(ctx, d):
    import torch
    hf = ctx.copy_hf(d, "single-bin")
    p = os.path.join(hf, "pytorch_model.bin")
    sd = torch.load(p, weights_only=True)
    sd[QKV0] = "text"
    torch.save(sd, p)
    return Run(hf_to_ms(hf, os.path.join(d, "o.ckpt")), ["pytorch_model.bin", QKV0], [os.path.join(d, "o.ckpt")])


def case_bin_truncated(ctx, d):
    hf = ctx.copy_hf(d, "single-bin")
    p = os.path.join(hf, "pytorch_model.bin")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    return Run(hf_to_ms(hf, os.path.join(d, "o.ckpt")), ["pytorch_model.bin"], [os.path.join(d, "o.ckpt")])


def case_config_missing(ctx, d):
    hf = ctx.copy_hf(d)
    os.remove(os.path.join(hf, "config.json"))
    return Run(hf_to_ms(hf, os.path.join(d, "o.ckpt")), ["config.json"], [os.path.join(d, "o.ckpt")])


def case_config_bad_json(ctx, d):
    hf = ctx.copy_hf(d)
    open(os.path.join(hf, "config.json"), "w").write('{"num_layers": ')
    return Run(hf_to_ms(hf, os.path.join(d, "o.ckpt")), ["config.json"], [os.path.join(d, "o.ckpt")])


def case_config_contradicts_weights(ctx, d):
    hf = ctx.copy_hf(d)
    p = os.path.join(hf, "config.json")
    cfg = json.load(open(p))
    cfg["hidden_size"] = cfg["hidden_size"] * 2
    json.dump(cfg, open(p, "w"))
    return Run(hf_to_ms(hf, os.path.join(d, "o.ckpt")), ["config.json"], [os.path.join(d, "o.ckpt")])


def case_hf_to_ms_output_is_a_directory(ctx, d):
    out = os.path.join(d, "X")
    os.makedirs(out)
    return Run(hf_to_ms(ctx.hf(), out), [out])


def case_hf_to_ms_output_parent_is_a_file(ctx, d):
    blocker = os.path.join(d, "blocker")
    open(blocker, "w").write("x")
    out = os.path.join(blocker, "o.ckpt")
    return Run(hf_to_ms(ctx.hf(), out), ["blocker"])


def case_hf_to_ms_disk_full(ctx, d):
    mnt = os.path.join(d, "small")
    os.makedirs(mnt)
    out = os.path.join(mnt, "o.ckpt")
    return Run(hf_to_ms(ctx.hf(), out), [out, "No space left"], [out], unshare_mount=(mnt, "size=256k"))


def case_hf_to_ms_safetensors_disk_full(ctx, d):
    mnt = os.path.join(d, "small")
    os.makedirs(mnt)
    out = os.path.join(mnt, "o.safetensors")
    return Run(hf_to_ms(ctx.hf(), out), [out, "No space left"], [out], unshare_mount=(mnt, "size=256k"))


# ---------------------------------------------------------------------- converters: MindSpore -> HF
def case_ckpt_missing(ctx, d):
    return Run(ms_to_hf(os.path.join(d, "none.ckpt"), os.path.join(d, "hf")), ["none.ckpt"], [os.path.join(d, "hf")])


def case_ckpt_truncated(ctx, d):
    p = ctx.copy_ckpt(d)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) - 100])
    return Run(ms_to_hf(p, os.path.join(d, "hf")), ["in.ckpt"], [os.path.join(d, "hf")])


def case_ckpt_garbage(ctx, d):
    p = os.path.join(d, "in.ckpt")
    open(p, "wb").write(b"\x12\x34garbage" * 10)
    return Run(ms_to_hf(p, os.path.join(d, "hf")), ["in.ckpt"], [os.path.join(d, "hf")])


def case_ckpt_name_length_past_record(ctx, d):
    p = ctx.copy_ckpt(d)
    data = bytearray(open(p, "rb").read())
    i = data.index(b"transformer") - 1
    data[i] = 0x7F
    open(p, "wb").write(bytes(data))
    return Run(ms_to_hf(p, os.path.join(d, "hf")), ["in.ckpt"], [os.path.join(d, "hf")])


def case_ckpt_dims_contradict_bytes(ctx, d):
    from convert.ms_ckpt import save_ms_checkpoint
    import numpy as np
    p = save_ms_checkpoint([("w", np.zeros((3, 4), np.float32))], os.path.join(d, "in.ckpt"))
    data = open(p, "rb").read()
    j = data.index(b"\x08\x03")
    open(p, "wb").write(data[:j] + b"\x08\x05" + data[j + 2:])
    return Run(ms_to_hf(p, os.path.join(d, "hf")), ["in.ckpt", "w"], [os.path.join(d, "hf")])


def case_ckpt_missing_a_weight(ctx, d):
    from convert.ms_ckpt import MSCheckpoint, save_ms_checkpoint
    src = MSCheckpoint(ctx.ms_ckpt())
    p = save_ms_checkpoint(((n, src.read(n)) for n in src.names if "final_layernorm" not in n),
                           os.path.join(d, "in.ckpt"))
    return Run(ms_to_hf(p, os.path.join(d, "hf")), ["in.ckpt", "final_layernorm"], [os.path.join(d, "hf")])


def case_ms_to_hf_yaml_without_model_config(ctx, d):
    y = os.path.join(d, "run.yaml")
    open(y, "w").write("seed: 0\n")
    return Run(ms_to_hf(ctx.ms_ckpt(), os.path.join(d, "hf"), y), ["run.yaml"], [os.path.join(d, "hf")])


def case_ms_to_hf_safetensors_named_ckpt(ctx, d):
    fake = os.path.join(d, "model.ckpt")
    shutil.copy(os.path.join(ctx.hf(), "model.safetensors"), fake)
    out = os.path.join(d, "out")
    return Run(ms_to_hf(fake, out), ["model.ckpt", "format does not match the extension"], [out])


def case_hf_to_ms_malicious_pickle_bin(ctx, d):
    import torch
    hf = os.path.join(d, "hf")
    shutil.copytree(ctx.hf(), hf)
    os.remove(os.path.join(hf, "model.safetensors"))
    marker = os.path.join(d, "pwned")
    torch.save({"transformer.embedding.word_embeddings.weight": _Planted(marker)}, os.path.join(hf, "pytorch_model.bin"))
    out = os.path.join(d, "o.ckpt")
    return Run(hf_to_ms(hf, out), ["pytorch_model.bin", "refused", "more than tensors"], [out, marker])


def case_ms_to_hf_output_is_a_file(ctx, d):
    out = os.path.join(d, "hf")
    open(out, "w").write("x")
    return Run(ms_to_hf(ctx.ms_ckpt(), out), [out])


def case_ms_to_hf_tokenizer_missing(ctx, d):
    out = os.path.join(d, "hf")
    return Run(ms_to_hf(ctx.ms_ckpt(), out, None, "--tokenizer", os.path.join(d, "tok.model")), ["tok.model"], [out])


def case_ms_to_hf_disk_full(ctx, d):
    mnt = os.path.join(d, "small")
    os.makedirs(mnt)
    out = os.path.join(mnt, "hf")
    return Run(ms_to_hf(ctx.ms_ckpt(), out), [out, "No space left"], [out], unshare_mount=(mnt, "size=256k"))


def case_ms_safetensors_bad_header(ctx, d):
    from convert.hf_to_ms import convert_hf_to_ms
    p = os.path.join(d, "in.safetensors")
    convert_hf_to_ms(ctx.hf(), p, progress=False)
    _st_rewrite(p, lambda h: (h[QKV0].__setitem__("data_offsets", [0, 8]), h)[1])
    return Run(ms_to_hf(p, os.path.join(d, "hf")), ["in.safetensors", QKV0], [os.path.join(d, "hf")])


# ---------------------------------------------------------------------- the merger
def _dp_run(d, ranks=(0, 1), steps=(10,), world_size=None, differ=False):
    import numpy as np
    from convert.ms_ckpt import save_ms_checkpoint
    w = np.arange(32, dtype=np.float32).reshape(4, 8)
    for r in ranks:
        for s in steps:
            t = [("transformer.encoder.final_layernorm.weight", w + (r if differ else 0)),
                 ("global_step", np.array([s], np.int32))]
            if world_size is not None:
                t += [("world_size", np.array(world_size, np.int32)), ("rank_id", np.array(r, np.int32))]
            save_ms_checkpoint(t, os.path.join(d, "ckpt", f"rank_{r}", f"glm2-1_{s}.ckpt"))
    return os.path.join(d, "ckpt")


def case_merge_src_missing(ctx, d):
    return Run(merge(os.path.join(d, "nope"), os.path.join(d, "m.ckpt")), ["nope"], [os.path.join(d, "m.ckpt")])


def case_merge_rank_gap(ctx, d):
    src = _dp_run(d, ranks=(0, 2))
    return Run(merge(src, os.path.join(d, "m.ckpt")), ["rank_1", "missing"], [os.path.join(d, "m.ckpt")])


def case_merge_highest_rank_missing(ctx, d):
    src = _dp_run(d, ranks=(0, 1), world_size=3)
    return Run(merge(src, os.path.join(d, "m.ckpt")), ["rank_2", "missing"], [os.path.join(d, "m.ckpt")])


def case_merge_highest_rank_missing_world_size_flag(ctx, d):
    src = _dp_run(d, ranks=(0, 1))
    return Run(merge(src, os.path.join(d, "m.ckpt"), "--world-size", "4"), ["rank_2", "missing"],
               [os.path.join(d, "m.ckpt")])


def case_merge_ranks_disagree_on_step(ctx, d):
    src = _dp_run(d, ranks=(0, 1), steps=(5, 10))
    os.remove(os.path.join(src, "rank_1", "glm2-1_10.ckpt"))
    return Run(merge(src, os.path.join(d, "m.ckpt")), ["rank_1", "step 10"], [os.path.join(d, "m.ckpt")])


def case_merge_step_absent(ctx, d):
    src = _dp_run(d)
    return Run(merge(src, os.path.join(d, "m.ckpt"), "--step", "7"), ["rank_0", "step 7"], [os.path.join(d, "m.ckpt")])


def case_merge_replicas_differ(ctx, d):
    src = _dp_run(d, differ=True)
    return Run(merge(src, os.path.join(d, "m.ckpt")), ["rank_1", "final_layernorm"], [os.path.join(d, "m.ckpt")])


def case_merge_output_is_a_directory(ctx, d):
    src = _dp_run(d)
    out = os.path.join(d, "X")
    os.makedirs(out)
    return Run(merge(src, out), [out])


def case_merge_strategy_garbage(ctx, d):
    src = _dp_run(d)
    s = os.path.join(d, "strategy.ckpt")
    open(s, "wb").write(b"\xff\xfe not a strategy")
    return Run(merge(src, os.path.join(d, "m.ckpt"), "--strategy", s), ["strategy.ckpt"], [os.path.join(d, "m.ckpt")])


def case_merge_corrupt_rank_file(ctx, d):
    src = _dp_run(d)
    p = os.path.join(src, "rank_1", "glm2-1_10.ckpt")
    data = open(p, "rb").read()
    open(p, "wb").write(data[:-10])
    return Run(merge(src, os.path.join(d, "m.ckpt")), ["glm2-1_10.ckpt"], [os.path.join(d, "m.ckpt")])


def case_merge_every_newest_rank_file_empty(ctx, d):
    src = _dp_run(d)
    for r in (0, 1):
        open(os.path.join(src, f"rank_{r}", "glm2-1_10.ckpt"), "wb").close()
    return Run(merge(src, os.path.join(d, "m.ckpt")), ["glm2-1_10.ckpt", "empty"], [os.path.join(d, "m.ckpt")])


def case_merge_one_newest_rank_file_empty(ctx, d):
    src = _dp_run(d, steps=(5, 10))
    open(os.path.join(src, "rank_1", "glm2-1_10.ckpt"), "wb").close()
    return Run(merge(src, os.path.join(d, "m.ckpt")), ["rank_1", "empty"], [os.path.join(d, "m.ckpt")])


def case_merge_strategy_splits_data_parallel_replicas(ctx, d):
    src = _dp_run(d)
    s = os.path.join(d, "strategy.ckpt")
    from convert.strategy import Layout, write_strategy_file
    write_strategy_file(s, {"transformer.encoder.final_layernorm.weight": Layout((2,), (0, -1))}, 0)
    return Run(merge(src, os.path.join(d, "m.ckpt"), "--strategy", s), ["final_layernorm", "replicas"],
               [os.path.join(d, "m.ckpt")])


def case_merge_mixed_checkpoint_prefixes(ctx, d):
    src = _dp_run(d)
    for r in (0, 1):
        import shutil
        shutil.copy(os.path.join(src, f"rank_{r}", "glm2-1_10.ckpt"), os.path.join(src, f"rank_{r}", "other-1_12.ckpt"))
    return Run(merge(src, os.path.join(d, "m.ckpt")), ["prefixes", "--prefix"], [os.path.join(d, "m.ckpt")])


def case_split_output_not_empty(ctx, d):
    out = os.path.join(d, "out")
    os.makedirs(os.path.join(out, "keep"))
    s = os.path.join(d, "strategy.ckpt")
    from convert.strategy import Layout, write_strategy_file
    write_strategy_file(s, {"transformer.encoder.final_layernorm.weight": Layout((2,), (-1,))}, 0)
    return Run([PY, _script("convert/merge_shards.py"), "split", "--src", ctx.ms_ckpt(), "--strategy", s,
                "--output", out, "--quiet"], [out])


# ---------------------------------------------------------------------- adapters
def case_adapters_peft_dir_missing(ctx, d):
    out = os.path.join(d, "lora.ckpt")
    return Run([PY, _script("convert/adapters.py"), "peft-to-ms", "--adapter", os.path.join(d, "nope"),
                "--output", out, "--pet-config", os.path.join(d, "pet.yaml")], ["nope"], [out])


# ---------------------------------------------------------------------- the data pipeline
def _data(d, text, name="train.json"):
    p = os.path.join(d, name)
    open(p, "w", encoding="utf-8").write(text)
    return p


def _tok():
    return os.path.join(ROOT, "tests", "fixtures", "tokenizer", "tiny_glm2_sp.model")


def case_data_check_missing_file(ctx, d):
    return Run([PY, "-m", "glm_common.data", "check", os.path.join(d, "none.json")], ["none.json"])


def case_data_stats_bad_json_line(ctx, d):
    p = _data(d, '{"content": "a", "summary": "b"}\n{"content": "a", \n')
    return Run([PY, "-m", "glm_common.data", "stats", p, "--tokenizer", _tok()], ["train.json"])


def case_data_features_missing_tokenizer(ctx, d):
    p = _data(d, '{"content": "a", "summary": "b"}\n')
    out = os.path.join(d, "f.npz")
    return Run([PY, "-m", "glm_common.data", "features", p, "--tokenizer", os.path.join(d, "tok.model"),
                "--out", out], ["tok.model"], [out])


def case_data_features_output_is_a_directory(ctx, d):
    p = _data(d, '{"content": "a", "summary": "b"}\n')
    out = os.path.join(d, "f.npz")
    os.makedirs(out)
    return Run([PY, "-m", "glm_common.data", "features", p, "--tokenizer", _tok(), "--out", out], ["f.npz"])


def case_data_features_bad_row(ctx, d):
    p = _data(d, '{"content": "a", "summary": "b"}\n{"content": 3}\n')
    out = os.path.join(d, "f.npz")
    return Run([PY, "-m", "glm_common.data", "features", p, "--tokenizer", _tok(), "--out", out],
               ["train.json"], [out])


# ---------------------------------------------------------------------- the run YAML (imports MindSpore: slow)
def case_run_yaml_syntax_error(ctx, d):
    y = _data(d, "seed: 0\nrunner_config: [\n", "run.yaml")
    return Run([PY, "-m", "mindspore_glm.run", "--config", y, "--run_mode", "eval"], ["run.yaml"])


def case_run_yaml_bad_value(ctx, d):
    src = open(os.path.join(ROOT, "configs", "tiny", "run_tiny_lora.yaml"), encoding="utf-8").read()
    y = _data(d, src.replace("epochs:", "epochs: many #", 1), "run.yaml")
    return Run([PY, "-m", "mindspore_glm.run", "--config", y, "--run_mode", "eval"], ["run.yaml", "epochs"])


# ---------------------------------------------------------------------- rank tables
def _table(server="10.0.0.1", ips=("192.1.27.6", "192.2.27.6")):
    return {"version": "1.0", "server_count": "1",
            "server_list": [{"server_id": server, "device": [{"device_id": str(i), "device_ip": ip, "rank_id": str(i)}
                                                             for i, ip in enumerate(ips)], "host_nic_ip": "reserve"}],
            "status": "completed"}


def _conf(d):
    p = os.path.join(d, "hccn.conf")
    open(p, "w").write("".join(f"address_{i}=192.168.100.{i + 1}\n" for i in range(8)))
    return p


def case_rank_table_missing(ctx, d):
    return Run([PY, _script("hccl/validate.py"), os.path.join(d, "none.json")], ["none.json"])


def case_rank_table_bad_json(ctx, d):
    p = _data(d, '{"version": "1.0",', "t.json")
    return Run([PY, _script("hccl/validate.py"), p], ["t.json"])


def case_rank_table_bad_ip(ctx, d):
    p = _data(d, json.dumps(_table(ips=("192.1.27.6", "300.1.1.1"))), "t.json")
    return Run([PY, _script("hccl/validate.py"), p], ["t.json", "device_ip"])


def case_rank_table_devices_outside_the_range(ctx, d):
    t = _table()
    for dev, entry in zip((2, 3), t["server_list"][0]["device"]):
        entry["device_id"] = str(dev)
    p = _data(d, json.dumps(t), "t.json")
    return Run([PY, _script("hccl/validate.py"), p, "--device-range", "[0,2)"], ["t.json", "devices 2, 3"])


def case_rank_table_device_past_the_node(ctx, d):
    t = _table()
    t["server_list"][0]["device"][1]["device_id"] = "9"
    p = _data(d, json.dumps(t), "t.json")
    return Run([PY, _script("hccl/validate.py"), p, "--device-count", "8"], ["t.json", "device 9"])


def case_merge_hccl_duplicate_server(ctx, d):
    a = _data(d, json.dumps(_table()), "a.json")
    b = _data(d, json.dumps(_table(ips=("192.1.28.6", "192.2.28.6"))), "b.json")
    out = os.path.join(d, "m.json")
    return Run([PY, _script("hccl/merge_hccl.py"), a, b, "-o", out], ["b.json", "server_id"], [out])


def case_merge_hccl_output_read_only(ctx, d):
    a = _data(d, json.dumps(_table()), "a.json")
    ro = os.path.join(d, "ro")
    os.makedirs(ro)
    out = os.path.join(ro, "m.json")
    return Run([PY, _script("hccl/merge_hccl.py"), a, "-o", out], [ro], [out], unshare_mount=(ro, "ro,size=64k"))


def case_hccl_tools_output_read_only(ctx, d):
    ro = os.path.join(d, "ro")
    os.makedirs(ro)
    return Run([PY, _script("hccl/hccl_tools.py"), "--device_num", "[0,8)", "--server_ip", "10.0.0.1",
                "--hccn_conf", _conf(d), "--output", ro], [ro], unshare_mount=(ro, "ro,size=64k"))


def case_hccl_tools_output_is_a_file(ctx, d):
    blocker = os.path.join(d, "blocker")
    open(blocker, "w").write("x")
    return Run([PY, _script("hccl/hccl_tools.py"), "--device_num", "[0,8)", "--server_ip", "10.0.0.1",
                "--hccn_conf", _conf(d), "--output", blocker], ["blocker"])


def case_hccl_tools_bad_range(ctx, d):
    return Run([PY, _script("hccl/hccl_tools.py"), "--device_num", "[3,5)", "--server_ip", "10.0.0.1",
                "--hccn_conf", _conf(d), "--output", d], ["--device_num"])


def case_hccl_tools_conf_missing(ctx, d):
    return Run([PY, _script("hccl/hccl_tools.py"), "--device_num", "[0,8)", "--server_ip", "10.0.0.1",
                "--hccn_conf", os.path.join(d, "none.conf"), "--output", d], ["none.conf"])


# ---------------------------------------------------------------------- resume (torch_glm; see the docstring)
def _resume_copy(ctx, d):
    run = ctx.torch_run()
    out = os.path.join(d, "out")
    shutil.copytree(os.path.join(run, "out"), out)
    return run, out


class _Planted:
    """A pickle that, when unpickled, writes a marker file (what an attacker's would do instead)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('executed')",)


def case_resume_pickle_in_checkpoint(ctx, d):
    import torch
    run, out = _resume_copy(ctx, d)
    marker = os.path.join(d, "pwned")
    ck = os.path.join(out, "checkpoint")
    latest = os.path.join(ck, "tiny_step_4")
    os.remove(os.path.join(latest, "trainer_state.json"))     # the old pickled layout ...
    for step in (3, 4):                                        # ... and a pickle planted beside a complete one
        torch.save(_Planted(marker), os.path.join(ck, f"tiny_step_{step}", "trainer_state.pt"))
    return Expect(torch_train(run, out, "--resume"),
                  [f"skipping checkpoint {latest}: no trainer_state.json; its trainer_state.pt is a pickle",
                   f"resuming from {os.path.join(ck, 'tiny_step_3')} at step 3"], [marker])


def case_resume_loss_log_cut_short(ctx, d):
    run, out = _resume_copy(ctx, d)
    shutil.rmtree(os.path.join(out, "checkpoint", "tiny_step_4"))
    log = os.path.join(out, "loss_log.jsonl")
    lines = open(log, encoding="utf-8").read().splitlines(keepends=True)
    open(log, "w", encoding="utf-8").write("".join(lines[:3]) + lines[3][:17])   # killed while writing row 4
    return Expect(torch_train(run, out, "--resume"),
                  [f"{log}: line 4 is cut short (the run stopped while writing it); dropped it"])


def _damaged_latest(ctx, d, damage):
    run, out = _resume_copy(ctx, d)
    latest = os.path.join(out, "checkpoint", "tiny_step_4")
    p = os.path.join(latest, damage[0])
    data = open(p, "rb").read()
    open(p, "wb").write(data[:len(data) // 2] if damage[1] == "half" else b"")
    return Expect(torch_train(run, out, "--resume"),
                  [f"skipping checkpoint {latest}: {damage[0]}",
                   f"resuming from {os.path.join(out, 'checkpoint', 'tiny_step_3')} at step 3"])


def case_resume_latest_checkpoint_zero_length(ctx, d):
    return _damaged_latest(ctx, d, ("trainable.safetensors", "empty"))


def case_resume_latest_checkpoint_truncated(ctx, d):
    return _damaged_latest(ctx, d, ("trainer_state.safetensors", "half"))


_AGREE = """
import sys
from glm_common.resume import choose_resume, verify_candidates
from torch_glm.resume import candidates, verify_checkpoint
ranks = sys.argv[1:]
ver = [verify_candidates(candidates(c, "tiny"), lambda p, s: verify_checkpoint(p, s, 1)) for c in ranks]
for r, v in enumerate(ver):
    for line in v.skipped:
        print(f"rank {r}: {line}", file=sys.stderr)
mine = lambda v: {"steps": sorted(v.paths, reverse=True), "foreign": v.foreign[:1], "skipped": len(v.skipped)}
payloads = [mine(v) for v in ver]
got = [choose_resume(v, lambda obj: payloads, r, len(ranks), where=ranks[r]) for r, v in enumerate(ver)]
print(got[0].line, file=sys.stderr)
print(f"steps chosen: {sorted(set(g.step for g in got))}", file=sys.stderr)
"""


def case_resume_ranks_latest_steps_disagree(ctx, d):
    run, a = _resume_copy(ctx, d)
    b = os.path.join(d, "rank1")
    shutil.copytree(a, b)
    ck = os.path.join(b, "checkpoint")
    os.rename(os.path.join(ck, "tiny_step_4"), os.path.join(ck, "tiny_step_4.tmp"))   # killed while writing it
    p = os.path.join(ck, "tiny_step_4.tmp", "trainable.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[:len(data) // 3])
    return Expect([PY, "-c", _AGREE, os.path.join(a, "checkpoint"), ck],
                  ["resuming all 2 ranks at step 3 (the newest step every rank holds complete); "
                   "newer steps skipped: rank 1 has no complete step 4", "steps chosen: [3]"])


# ---------------------------------------------------------------------- the launcher (tests/faults/launch_cases.py)
def _launch_case(name, kind, run):
    def case(ctx, d):
        ok, why = run(ctx.launch_tmp())
        return Checked(ok, why, "refused" if kind == "refused" else "handled")
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    while "__" in slug:
        slug = slug.replace("__", "_")
    case.__name__ = f"case_launch_{slug}"
    return case


def _launch_cases() -> list:
    from tests.faults.launch_cases import CASES as LAUNCH
    return [_launch_case(*c) for c in LAUNCH]


CASES: list[Callable] = ([v for k, v in list(globals().items()) if k.startswith("case_") and callable(v)]
                         + _launch_cases())
SLOW = {"case_run_yaml_syntax_error", "case_run_yaml_bad_value"}     # they import MindSpore


# ---------------------------------------------------------------------- running and judging
_UNSHARE: Optional[bool] = None


def _unshare_ok() -> bool:
    global _UNSHARE
    if _UNSHARE is None:
        _UNSHARE = bool(shutil.which("unshare")) and subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode == 0
    return _UNSHARE


def _leftovers(d: str, outputs: list) -> list[str]:
    found = [p for p in outputs if os.path.lexists(p)]
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            if n.endswith((".partial", ".old")) or n.startswith((".tmp_", ".partial-", ".split-")):
                found.append(os.path.join(root, n))
    return found


def _judge_expect(exp: Expect, d: str) -> tuple[bool, str]:
    try:
        res = subprocess.run([str(c) for c in exp.cmd], capture_output=True, text=True, cwd=d, env=_env(),
                             timeout=exp.timeout)
    except subprocess.TimeoutExpired:
        return False, f"no answer within {exp.timeout:.0f} s"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if "Traceback" in res.stderr:
        return False, f"traceback: {lines[-1] if lines else ''}"
    if res.returncode != exp.rc:
        return False, f"exit {res.returncode}, not {exp.rc}: {' | '.join(lines[-3:])[:300]}"
    found = [p for p in exp.absent if os.path.lexists(p)]
    if found:
        return False, f"must not exist but does: {', '.join(os.path.relpath(p, d) for p in found)}"
    missing = [x for x in exp.lines if not any(x in ln for ln in lines)]
    if missing:
        return False, f"no line saying {missing[0]!r} (stderr: {' | '.join(lines[-3:])[:300]})"
    said = [next(ln for ln in lines if x in ln) for x in exp.lines]
    return True, " | ".join(dict.fromkeys(said))


def judge(run, d: str) -> tuple[bool, str]:
    """``(refused cleanly or handled, why / the error line)`` for the case result ``run`` (a :class:`Run`,
    :class:`Expect` or :class:`Checked`) executed in folder ``d``."""
    if isinstance(run, Checked):
        return run.ok, run.why
    if isinstance(run, Expect):
        return _judge_expect(run, d)
    env = _env()
    cmd = [str(c) for c in run.cmd]
    if run.unshare_mount:
        if not _unshare_ok():
            raise Skip("needs user namespaces (unshare -rm) to mount a small tmpfs")
        mnt, opts = run.unshare_mount
        import shlex
        leftover_check = f"; rc=$?; ls -A {shlex.quote(mnt)} | sed 's/^/left in the mount: /' >&2; exit $rc"
        cmd = ["unshare", "-rm", "sh", "-c",
               f"mount -t tmpfs -o {opts} tmpfs {shlex.quote(mnt)} && {shlex.join(cmd)}{leftover_check}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=d, env=env, timeout=run.timeout)
    except subprocess.TimeoutExpired:
        return False, f"no answer within {run.timeout:.0f} s"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if res.returncode == 0:
        return False, f"exit 0 (stdout: {res.stdout.strip()[:120]!r})"
    if "Traceback" in res.stderr:
        return False, f"traceback: {lines[-1] if lines else ''}"
    if len(lines) != 1:
        return False, f"{len(lines)} lines on stderr: {' | '.join(lines[:3])[:300]}"
    missing = [str(n) for n in run.names if str(n) not in first]
    if missing:
        return False, f"line does not name {missing}: {first}"
    left = _leftovers(d, run.outputs)
    if left:
        return False, f"left behind: {', '.join(os.path.relpath(p, d) for p in left)}"
    return True, first
