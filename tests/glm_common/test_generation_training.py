"""glm_common.generation (the token budget both backends use) and glm_common.training (what both trainers
compute alike from the run settings)."""
import types

import pytest

from glm_common.generation import chat_token_budget, new_token_budget
from glm_common.run_config import RunConfigError, TrainSettings
from glm_common.training import (clean_answer, dataset_kwargs, merge_shards, total_updates, train_features,
                                 updates_per_epoch)


def test_new_token_budget():
    assert new_token_budget(10, max_new_tokens=5) == 5
    assert new_token_budget(10, max_length=12) == 2
    assert new_token_budget(10, max_new_tokens=3, max_length=100) == 3      # max_new_tokens wins
    assert new_token_budget(10, max_length=8) == -2                         # nothing to generate
    with pytest.raises(ValueError, match="max_new_tokens or max_length"):
        new_token_budget(10)


def test_chat_token_budget_bounded_by_seq_length():
    assert chat_token_budget(10, None, 8192, seq_length=32) == 21           # positions stay < seq_length
    assert chat_token_budget(10, 4, 8192, seq_length=32) == 4
    with pytest.raises(ValueError, match="stream_chat: the prompt has 31 tokens"):
        chat_token_budget(31, None, 8192, seq_length=32, caller="stream_chat")


def _settings(**kw):
    s = TrainSettings(config=types.SimpleNamespace(seq_length=64), source="run.yaml")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_dataset_kwargs_carry_the_yaml_padding_and_seeds():
    s = _settings(shuffle=False, data_seed=7, drop_remainder=False, padding="bucket")
    assert dataset_kwargs(s, 1, 4) == dict(shuffle=False, seed=7, rank=1, world_size=4, drop_remainder=False,
                                           padding="bucket")


def test_step_budget():
    s = _settings(grad_accum=3, epochs=2, max_steps=-1)
    assert updates_per_epoch(s, 10) == 3 and total_updates(s, 3) == 6
    s.max_steps = 4
    assert total_updates(s, 3) == 4
    with pytest.raises(RunConfigError, match="run.yaml: runner_config.gradient_accumulation_steps: 3 is more than"):
        updates_per_epoch(s, 2)


def test_train_features_needs_a_file():
    with pytest.raises(RunConfigError, match="run.yaml: train_dataset.data_loader.dataset_dir: missing"):
        train_features(_settings(train_file=""), tokenizer=None)


def test_answers_cleaned_and_merged():
    tok = types.SimpleNamespace(eos_token_id=2, pad_token_id=0)
    assert clean_answer(tok, [5, 0, 6, 2, 7]) == [5, 6]
    assert merge_shards([["a", "c"], ["b"]], 3) == ["a", "b", "c"]


def test_the_loss_comes_from_the_last_pipeline_stage():
    """MindSpore returns the training loss on the last pipeline stage only (ranks stage-major): that stage's
    first rank writes the loss log; without stages rank 0."""
    from glm_common.training import loss_rank
    assert loss_rank(1) == loss_rank(8, 1) == 0
    assert loss_rank(8, 2) == 4 and loss_rank(16, 8) == 14 and loss_rank(8, 8) == 7


def test_overflow_streak_stops_after_the_limit_in_a_row():
    from glm_common.training import OverflowStreak, TrainingError
    streak = OverflowStreak(3)
    for step, overflow in enumerate([True, True, False, True, True], 1):
        streak.update(step, overflow, 1024.0)
    with pytest.raises(TrainingError, match=r"^step 6: 3 consecutive updates overflowed \(loss scale 512\); stopping"):
        streak.update(6, True, 512.0)
