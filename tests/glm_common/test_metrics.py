"""glm_common.metrics: the official ADGEN metrics, checked against the libraries used by hand."""
import math

import jieba
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from glm_common.metrics import ADGENMetric, compute_metrics, example_scores

PAIRS = [
    ("这款连衣裙采用简约的设计，显得优雅大方。", "这款连衣裙简约大方，采用优雅的设计，显得很有气质。"),
    ("宽松的版型，穿着舒适。", "宽松版型设计，穿着舒适自在，不挑身材。"),
    ("牛仔裤", "这条牛仔裤的破洞设计很时尚"),
]


def official(pred, label):
    """ChatGLM2 ptuning compute_metrics, one example, written out with the libraries."""
    rouge = Rouge().get_scores(" ".join(jieba.cut(pred)), " ".join(jieba.cut(label)))[0]
    out = {k: round(rouge[k]["f"] * 100, 4) for k in ("rouge-1", "rouge-2", "rouge-l")}
    out["bleu-4"] = round(sentence_bleu([list(label)], list(pred),
                                        smoothing_function=SmoothingFunction().method3) * 100, 4)
    return out


def test_each_example_as_official():
    for pred, label in PAIRS:
        assert example_scores(pred, label) == official(pred, label)


def test_mean_over_examples():
    got = compute_metrics([p for p, _ in PAIRS], [l for _, l in PAIRS])
    for k in got:
        assert got[k] == pytest.approx(sum(official(p, l)[k] for p, l in PAIRS) / len(PAIRS), abs=1e-9)


def test_known_values_by_hand():
    # identical texts: every n-gram matches
    assert example_scores("红色的裙子很漂亮", "红色的裙子很漂亮") == {
        "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
    # "abcd" vs "abce" by characters: p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1 -> method3 replaces the
    # first zero precision by 1 / (2^1 * number of 4-grams) = 1/2; brevity penalty 1
    expected = math.exp((math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)) / 4) * 100
    assert example_scores("abcd", "abce")["bleu-4"] == round(expected, 4)


def test_accumulator_and_errors():
    m = ADGENMetric()
    m.update([PAIRS[0][0]], [PAIRS[0][1]])
    m.update([p for p, _ in PAIRS[1:]], [l for _, l in PAIRS[1:]])
    assert len(m) == 3 and m.eval() == compute_metrics([p for p, _ in PAIRS], [l for _, l in PAIRS])
    assert example_scores("", "裙子")["rouge-1"] == 0.0
    with pytest.raises(ValueError, match="2 items"):
        m.update(["a", "b"], ["a"])
    m.clear()
    with pytest.raises(ValueError, match="no examples"):
        m.eval()
