"""Outputs never touch inputs: every writer refuses an output that is, contains or lies inside one of its
inputs (by real path and by inode), and a non-empty output folder unless ``--overwrite`` (which replaces
only the command's own files). Each refusal: non-zero exit, one line naming the output, nothing written,
the inputs byte for byte as they were (hashed before and after)."""
import hashlib
import os

import numpy as np
import pytest

from convert import adapters, hf_layout, hf_to_ms, merge_shards, ms_to_hf
from convert.hf_layout import write_tiny_hf_dir
from convert.ms_ckpt import save_ms_checkpoint
from glm_common.data import __main__ as data_cli
from glm_common.fsutil import OutputError, check_output
from tests.conftest import ADGEN_DIR, TOKENIZER_MODEL


def tree_hash(*paths) -> dict:
    """``{file: sha256}`` of every file under ``paths`` (files or folders)."""
    out = {}
    for p in map(str, paths):
        files = [p] if os.path.isfile(p) else [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs]
        for f in files:
            with open(f, "rb") as fh:
                out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


def refused(capsys, rc, *words):
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert rc not in (0, None) and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    for w in words:
        assert str(w) in err[0], err[0]
    return err[0]


def no_partials(*dirs):
    for d in map(str, dirs):
        for root, names, files in os.walk(d):
            assert not [n for n in names + files if ".partial" in n], (root, names, files)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_dir(str(tmp_path_factory.mktemp("hf") / "tiny"))


@pytest.fixture(scope="module")
def ms_ckpt(hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ms") / "tiny.ckpt")
    assert hf_to_ms.main(["--hf-dir", hf_dir, "--output", out, "--no-progress"]) == 0
    return out


def test_hf_to_ms_output_is_the_input_file(hf_dir, capsys):
    before = tree_hash(hf_dir)
    target = os.path.join(hf_dir, "model.safetensors")
    refused(capsys, hf_to_ms.main(["--hf-dir", hf_dir, "--output", target, "--format", "safetensors",
                                   "--no-progress"]), target, "input")
    assert tree_hash(hf_dir) == before
    no_partials(hf_dir)


def test_hf_to_ms_output_inside_the_input_folder(hf_dir, capsys):
    before = tree_hash(hf_dir)
    target = os.path.join(hf_dir, "out.ckpt")
    refused(capsys, hf_to_ms.main(["--hf-dir", hf_dir, "--output", target, "--no-progress"]), target, "inside")
    assert tree_hash(hf_dir) == before and not os.path.exists(target)


def test_hf_to_ms_output_through_a_symlink_or_hard_link(hf_dir, tmp_path, capsys):
    before = tree_hash(hf_dir)
    link = tmp_path / "link.safetensors"
    os.symlink(os.path.join(hf_dir, "model.safetensors"), link)
    refused(capsys, hf_to_ms.main(["--hf-dir", hf_dir, "--output", str(link), "--no-progress"]), link, "input")
    hard = tmp_path / "hard.safetensors"
    os.link(os.path.join(hf_dir, "model.safetensors"), hard)
    refused(capsys, hf_to_ms.main(["--hf-dir", hf_dir, "--output", str(hard), "--no-progress"]), hard, "input")
    assert tree_hash(hf_dir) == before


def test_ms_to_hf_into_the_folder_holding_its_input(ms_ckpt, hf_dir, capsys):
    before = tree_hash(os.path.dirname(ms_ckpt))
    folder = os.path.dirname(ms_ckpt)
    refused(capsys, ms_to_hf.main(["--ckpt", ms_ckpt, "--config", hf_dir, "--output", folder, "--no-progress",
                                   "--overwrite"]), folder, "contains the input")
    assert tree_hash(folder) == before
    no_partials(os.path.dirname(folder))


def test_ms_to_hf_non_empty_folder_needs_overwrite_and_keeps_user_files(ms_ckpt, hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    before = tree_hash(out)
    refused(capsys, ms_to_hf.main(["--ckpt", ms_ckpt, "--config", hf_dir, "--output", str(out), "--no-progress"]),
            out, "not empty", "--overwrite")
    assert tree_hash(out) == before
    assert ms_to_hf.main(["--ckpt", ms_ckpt, "--config", hf_dir, "--output", str(out), "--no-progress",
                          "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"            # not ours: left alone
    assert (out / "config.json").read_text() != "{}"            # ours: replaced
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("size", ["0", "-5", "0GB", "nan", "inf"])
def test_ms_to_hf_max_shard_size_must_be_positive(ms_ckpt, hf_dir, tmp_path, capsys, size):
    out = tmp_path / "out"
    refused(capsys, ms_to_hf.main(["--ckpt", ms_ckpt, "--config", hf_dir, "--output", str(out), "--no-progress",
                                   f"--max-shard-size={size}"]), "max-shard-size")
    assert not out.exists()


def test_merge_shards_output_into_a_rank_folder(tmp_path, capsys):
    src = tmp_path / "checkpoint"
    (src / "rank_0").mkdir(parents=True)
    ckpt = src / "rank_0" / "glm2_rank_0-1_4.ckpt"
    save_ms_checkpoint([("w", np.ones((2, 2), np.float32))], str(ckpt))
    before = tree_hash(src)
    for target in (ckpt, src / "rank_0" / "merged.ckpt"):
        refused(capsys, merge_shards.main(["--src", str(src), "--output", str(target), "--quiet"]), target)
        assert tree_hash(src) == before
    no_partials(src)


def test_adapters_merge_into_the_base_folder(hf_dir, tmp_path, capsys):
    before = tree_hash(hf_dir)
    refused(capsys, adapters.main(["merge", "--base", hf_dir, "--adapter", str(tmp_path), "--output", hf_dir,
                                   "--no-progress", "--overwrite"]), hf_dir, "input")
    assert tree_hash(hf_dir) == before


def test_hf_layout_tiny_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    refused(capsys, hf_layout.main(["tiny", "--out", str(tmp_path)]), tmp_path, "not empty")
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
    assert hf_layout.main(["tiny", "--out", str(tmp_path), "--overwrite"]) == 0
    assert (tmp_path / "keep.txt").read_text() == "mine" and (tmp_path / "model.safetensors").is_file()


def test_data_features_onto_its_own_input(tmp_path, capsys):
    data = tmp_path / "train.json"
    data.write_bytes((ADGEN_DIR / "train.json").read_bytes())
    before = tree_hash(data, TOKENIZER_MODEL)
    for out in (data, TOKENIZER_MODEL):
        refused(capsys, data_cli.main(["features", str(data), "--tokenizer", str(TOKENIZER_MODEL), "--out", str(out)]),
                out, "input")
    assert tree_hash(data, TOKENIZER_MODEL) == before


def test_trainer_output_dir_checked_against_its_inputs(tmp_path):
    from glm_common.config import ChatGLM2Config
    from glm_common.run_config import TrainSettings
    from glm_common.training import check_output_dir
    data = tmp_path / "data"
    data.mkdir()
    train = data / "train.json"
    train.write_text("{}")
    s = TrainSettings(config=ChatGLM2Config(), source="run.yaml", train_file=str(train), vocab_file=str(TOKENIZER_MODEL))
    s.output_dir = str(train)                          # the input itself
    with pytest.raises(OutputError, match="output_dir"):
        check_output_dir(s)
    s.output_dir = str(data)                           # holds the data: allowed unless a written name is an input
    check_output_dir(s)
    s.train_file = str(data / "loss_log.jsonl")
    with pytest.raises(OutputError, match="loss_log.jsonl"):
        check_output_dir(s)
    s.train_file, s.load_checkpoint = str(train), str(data / "checkpoint" / "glm2_step_4")
    check_output_dir(s)                                # its own checkpoint, for resuming


def test_check_output_rules(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.bin").write_bytes(b"x")
    with pytest.raises(OutputError, match="is the input"):
        check_output(str(d / "a.bin"), [str(d / "a.bin")])
    with pytest.raises(OutputError, match="inside"):
        check_output(str(d / "new"), [str(d)])
    with pytest.raises(OutputError, match="contains"):
        check_output(str(tmp_path), [str(d / "a.bin")])
    assert check_output(str(tmp_path / "fresh"), [str(d), None, ""], overwrite=False) == str(tmp_path / "fresh")


def _existing_file_cases(hf_dir, ms_ckpt, tmp_path):
    """``(name, argv runner, output file)`` for every command that writes one file."""
    out = tmp_path / "out"
    out.mkdir()
    rank = tmp_path / "run" / "rank_0"
    rank.mkdir(parents=True)
    save_ms_checkpoint([("w", np.ones((2, 2), np.float32))], str(rank / "glm2_rank_0-1_4.ckpt"))
    cases = {
        "hf_to_ms": (lambda o, *x: hf_to_ms.main(["--hf-dir", hf_dir, "--output", o, "--no-progress", *x]),
                     out / "model.ckpt"),
        "merge_shards": (lambda o, *x: merge_shards.main(["--src", str(tmp_path / "run"), "--output", o, "--quiet",
                                                          *x]), out / "merged.ckpt"),
        "adapters merge": (lambda o, *x: adapters.main(["merge", "--base", ms_ckpt, "--adapter", ms_ckpt,
                                                        "--output", o, "--no-progress", *x]), out / "merged_lora.ckpt"),
        "data features": (lambda o, *x: data_cli.main(["features", str(ADGEN_DIR / "train.json"), "--tokenizer",
                                                       str(TOKENIZER_MODEL), "--out", o, *x]), out / "feats.npz"),
    }
    return cases


@pytest.mark.parametrize("name", ["hf_to_ms", "merge_shards", "adapters merge", "data features"])
def test_an_existing_output_file_needs_overwrite(name, hf_dir, ms_ckpt, tmp_path, capsys):
    """A file output that exists is refused in one line and left byte for byte as it was; ``--overwrite``
    replaces it (and only it)."""
    run, target = _existing_file_cases(hf_dir, ms_ckpt, tmp_path)[name]
    target.write_bytes(b"a user's file")
    (target.parent / "other.txt").write_text("mine")
    refused(capsys, run(str(target)), target, "exists", "--overwrite")
    assert target.read_bytes() == b"a user's file"
    no_partials(target.parent)
    rc = run(str(target), "--overwrite")
    if name == "adapters merge":   # the tiny base holds no LoRA: refused after the output check, file untouched
        refused(capsys, rc, "LoRA")
        assert target.read_bytes() == b"a user's file"
    else:
        assert rc == 0, capsys.readouterr().err
        assert target.read_bytes() != b"a user's file" and target.stat().st_size > 30
    assert (target.parent / "other.txt").read_text() == "mine"
