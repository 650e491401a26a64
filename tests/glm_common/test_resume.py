"""glm_common.resume (the step every rank resumes from) and the loss log's cut last line."""
import json

import pytest

from glm_common.resume import (CheckpointInvalid, ResumeError, agree, check_record, choose_resume, run_record,
                               verify_candidates)
from glm_common.train_log import LossLog, LossLogError, plot_losses, read_rows


def _payload(*steps, foreign=()):
    return {"steps": sorted(steps, reverse=True), "foreign": list(foreign)}


def test_agree_takes_the_newest_step_every_rank_holds():
    assert agree([_payload(16, 15, 12), _payload(15, 12)]) == 15
    assert agree([_payload(16, 12), _payload(15, 12), _payload(16, 15, 12)]) == 12
    assert agree([_payload(), _payload()]) == 0                      # fresh output_dir


def test_agree_refuses_to_start_over_when_no_step_is_common():
    with pytest.raises(ResumeError, match=r"^resume_training: no step is held complete by every rank "
                                          r"\(rank 0: 16, 15; rank 1: none\) in ckdir; "):
        agree([_payload(16, 15), _payload()], "ckdir")
    with pytest.raises(ResumeError, match=r"were written by a run of 4 rank\(s\), this run has 2"):
        agree([_payload(foreign=["written by a run of 4 rank(s), this run has 2"]), _payload()], "ckdir")
    with pytest.raises(ResumeError, match=r"^resume_training: no checkpoint in ckdir verifies \(rank 1: 2 skipped, "):
        agree([_payload(), {**_payload(), "skipped": 2}], "ckdir")


def test_choose_resume_says_which_rank_lacks_the_newer_step():
    verified = verify_candidates([(15, "r0/15"), (16, "r0/16")], lambda p, s: None)
    other = _payload(15)
    d = choose_resume(verified, lambda mine: [mine, other], rank=0, world=2)
    assert (d.step, d.path) == (15, "r0/15")
    assert d.line == ("resuming all 2 ranks at step 15 (the newest step every rank holds complete); "
                      "newer steps skipped: rank 1 has no complete step 16")
    one = choose_resume(verified, None, rank=0, world=1)
    assert (one.step, one.line) == (16, "resuming from r0/16 at step 16")


def test_resume_without_any_checkpoint_says_it_starts_from_step_0():
    from glm_common.resume import Verified
    d = choose_resume(Verified(), None, rank=0, world=1, where="out/checkpoint")
    assert (d.step, d.path) == (0, None)
    assert d.line == "resume_training: no checkpoint in out/checkpoint; starting from step 0"


def test_verify_candidates_skips_with_a_line_naming_the_file(tmp_path):
    good, empty, cut = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    good.write_bytes(b"ok")
    empty.write_bytes(b"")
    cut.write_bytes(b"o")

    def verify(path, step):
        if open(path, "rb").read() != b"ok":
            raise ValueError(f"{path}: truncated checkpoint (a value ends at byte 9 of 1)")
        check_record(run_record(2, 0, step), 2, 0, step)

    v = verify_candidates([(1, str(good)), (3, str(empty)), (2, str(cut))], verify)
    assert v.paths == {1: str(good)}
    assert v.skipped == [f"skipping checkpoint {empty}: empty file (0 bytes)",
                         f"skipping checkpoint {cut}: truncated checkpoint (a value ends at byte 9 of 1)"]


def test_check_record():
    check_record(run_record(2, 1, 7), 2, 1, 7)
    for record, want in (({"world_size": 2, "rank_id": 1}, "no step recorded"),
                         (run_record(4, 1, 7), "written by a run of 4 rank(s), this run has 2"),
                         (run_record(2, 0, 7), "written by rank 0, not rank 1"),
                         (run_record(2, 1, 6), "records step 6, its name says 7")):
        with pytest.raises(CheckpointInvalid, match=want.replace("(", r"\(").replace(")", r"\)")):
            check_record(record, 2, 1, 7)


# ---------------------------------------------------------------------------------------- loss log
def _log(tmp_path, text):
    path = tmp_path / "loss_log.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_cut_last_line_is_dropped_naming_the_file(tmp_path, capsys):
    rows = [json.dumps({"step": k, "loss": 2.0 - k / 10}) for k in (1, 2, 3)]
    path = _log(tmp_path, "\n".join(rows) + "\n" + rows[2][:9])   # killed while writing row 4
    said = []
    assert [r["step"] for r in read_rows(str(path), say=said.append)] == [1, 2, 3]
    assert said == [f"{path}: line 4 is cut short (the run stopped while writing it); dropped it"]
    LossLog(str(path)).truncate(3)                                  # resume at step 3 repairs the file
    assert f"{path}: line 4 is cut short" in capsys.readouterr().err
    assert path.read_text(encoding="utf-8") == "\n".join(rows) + "\n"
    assert plot_losses(str(path), str(tmp_path / "curve.png"))


def test_last_row_without_newline_gets_one_on_resume(tmp_path):
    path = _log(tmp_path, '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}')
    log = LossLog(str(path))
    log.truncate(2)
    log.write({"step": 3, "loss": 1.0})
    assert [r["step"] for r in read_rows(str(path))] == [1, 2, 3]


def test_bad_line_in_the_middle_names_file_and_line(tmp_path):
    path = _log(tmp_path, '{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(LossLogError, match=rf"^{path}: line 2: Unterminated string starting at \(column 13\)$"):
        LossLog(str(path)).truncate(3)
    path = _log(tmp_path, '[1, 2]\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(LossLogError, match=r"line 1: not a row \(a JSON object with an integer \"step\"\)$"):
        read_rows(str(path))
