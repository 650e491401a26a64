"""glm_common.schedules: warmup + linear/cosine/polynomial/constant, total_steps -1, decay rule."""
import math

import numpy as np
import pytest

from glm_common.run_config import TrainSettings
from glm_common.config import preset
from glm_common.schedules import decays, learning_rates, lr_at, schedule_total


def settings(**kw):
    s = TrainSettings(config=preset("tiny"))
    s.learning_rate, s.lr_end, s.warmup_steps = 1.0, 0.1, 2
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_warmup_then_linear():
    s = settings(schedule="linear")
    assert [round(lr_at(k, s, 12), 6) for k in (0, 1, 2, 7, 12)] == [0.0, 0.5, 1.0, 0.55, 0.1]


def test_cosine_polynomial_constant():
    assert lr_at(7, settings(schedule="cosine"), 12) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(7, settings(schedule="polynomial", power=2.0), 12) == pytest.approx(0.1 + 0.9 * 0.25)
    assert lr_at(9, settings(schedule="constant"), 12) == 1.0
    assert lr_at(1, settings(schedule="polynomial", warmup_steps=0, warmup_ratio=0.25), 12) == pytest.approx(1 / 3)


def test_learning_rates_array_and_total_minus_one():
    s = settings(schedule="linear", epochs=3, total_steps=-1)
    total = schedule_total(s, 4)
    assert total == 12
    lrs = learning_rates(s, total)
    assert lrs.dtype == np.float32 and lrs.shape == (12,)
    assert np.allclose(lrs[[0, 1, 2, 7]], [0.0, 0.5, 1.0, 0.55])
    longer = learning_rates(s, total, length=15)
    assert longer.shape == (15,) and np.allclose(longer[12:], 0.1)
    assert schedule_total(settings(total_steps=5, epochs=3), 4) == 5


def test_decay_rule():
    assert decays("transformer.encoder.layers.0.mlp.dense_h_to_4h.weight", 2)
    assert not decays("transformer.encoder.layers.0.input_layernorm.weight", 1)
    assert not decays("transformer.encoder.layers.0.self_attention.query_key_value.bias", 1)
    assert decays("transformer.encoder.layers.0.self_attention.query_key_value.mindpet_delta_lora_a", 2)
