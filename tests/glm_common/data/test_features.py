"""Train/eval features: the golden official features, truncation modes, multi-turn formats, plain text."""
import json

import numpy as np
import pytest

from glm_common.data import Round, Sample, build_eval_features, build_train_features, length_stats, load_samples
from tests.conftest import ADGEN_DIR, TOKENIZER_CASES

EOS, PAD, IGN = 2, 0, -100


@pytest.fixture(scope="module")
def golden():
    return json.loads(TOKENIZER_CASES.read_text(encoding="utf-8"))["train_features"]


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def expect(tok, parts, L):
    """Right-padded (ids, labels) from [(ids, trained), ...] written out by hand."""
    ids, lab = [], []
    for p, trained in parts:
        ids += p
        lab += p if trained else [IGN] * len(p)
    ids, lab = ids + [PAD] * (L - len(ids)), lab + [IGN] * (L - len(lab))
    return np.array(ids), np.array(lab)


def test_golden_official_train_features(tmp_path, tokenizer, golden):
    path = tmp_path / "train.json"
    path.write_text("".join(json.dumps({"content": c["content"], "summary": c["summary"]}, ensure_ascii=False) + "\n"
                            for c in golden), encoding="utf-8")
    S, T = golden[0]["max_source_length"], golden[0]["max_target_length"]
    f = build_train_features(load_samples(path), tokenizer, "official", S, T)
    assert f["input_ids"].dtype == np.int64 and f["input_ids"].shape == (len(golden), S + T + 1)
    for i, c in enumerate(golden):
        np.testing.assert_array_equal(f["input_ids"][i], c["input_ids"])
        np.testing.assert_array_equal(f["labels"][i], c["labels"])
        assert f["lengths"][i] == max(j for j, x in enumerate(c["input_ids"]) if x == EOS) + 1
    # rounds mode differs only where the prompt was cut, and there it keeps the answer cue
    r = build_train_features(load_samples(path), tokenizer, "rounds", S, T)
    for i, c in enumerate(golden):
        full = tokenizer.encode(f"[Round 1]\n\n问：{c['content']}\n\n答：")
        if len(full) <= S:
            np.testing.assert_array_equal(r["input_ids"][i], c["input_ids"])
        else:
            assert tokenizer.decode(r["input_ids"][i][:S]).endswith("答：")
            assert list(r["input_ids"][i][:S - 5]) == full[:S - 5]


def test_official_chat_with_history(tokenizer):
    s = Sample([Round("北京今天天气怎么样？", "北京今天晴。", False), Round("那上海呢？", "上海多云。")])
    f = build_train_features([s], tokenizer, "official", 64, 32)
    prompt = tokenizer.encode("[Round 1]\n\n问：北京今天天气怎么样？\n\n答：北京今天晴。\n\n[Round 2]\n\n问：那上海呢？\n\n答：")
    ids, lab = expect(tokenizer, [(prompt, False), (enc(tokenizer, "上海多云。") + [EOS], True)], 97)
    np.testing.assert_array_equal(f["input_ids"][0], ids)
    np.testing.assert_array_equal(f["labels"][0], lab)


def test_rounds_mode_drops_whole_old_rounds(tokenizer):
    hist = [("Tell me a story about a cat.", "Once upon a time there was a cat named Tom."),
            ("再讲一个关于狗的故事。", "从前有一只小狗叫旺财。")]
    s = Sample([Round(q, a, False) for q, a in hist] + [Round("Which one do you like?", "I like both.")])
    last = tokenizer.encode("[Round 1]\n\n问：再讲一个关于狗的故事。\n\n答：从前有一只小狗叫旺财。\n\n[Round 2]\n\n问：Which one do you like?\n\n答：")
    full = tokenizer.encode("[Round 1]\n\n问：Tell me a story about a cat.\n\n答：Once upon a time there was a cat "
                            "named Tom.\n\n[Round 2]\n\n问：再讲一个关于狗的故事。\n\n答：从前有一只小狗叫旺财。\n\n"
                            "[Round 3]\n\n问：Which one do you like?\n\n答：")
    S = len(last) + 1
    assert len(full) > S
    ans = enc(tokenizer, "I like both.") + [EOS]
    f = build_train_features([s], tokenizer, "rounds", S, 16)
    ids, lab = expect(tokenizer, [(last, False), (ans, True)], S + 17)
    np.testing.assert_array_equal(f["input_ids"][0], ids)
    np.testing.assert_array_equal(f["labels"][0], lab)
    o = build_train_features([s], tokenizer, "official", S, 16)          # official cuts the tail instead
    np.testing.assert_array_equal(o["input_ids"][0][:S + len(ans)], full[:S] + ans)


def test_session_rounds_concatenated(tokenizer):
    s = Sample([Round("Hi, who are you?", "I am ChatGLM2."), Round("你能做什么？", "我可以回答问题。")])
    f = build_train_features([s], tokenizer, "official", 64, 64)
    ids, lab = expect(tokenizer, [(tokenizer.encode("[Round 1]\n\n问：Hi, who are you?\n\n答："), False),
                                  (enc(tokenizer, "I am ChatGLM2."), True),
                                  (enc(tokenizer, "\n\n[Round 2]\n\n问：你能做什么？\n\n答："), False),
                                  (enc(tokenizer, "我可以回答问题。") + [EOS], True)], 129)
    np.testing.assert_array_equal(f["input_ids"][0], ids)
    np.testing.assert_array_equal(f["labels"][0], lab)
    # rounds mode with room for one round: round 2 alone, renumbered
    p2, a2 = tokenizer.encode("[Round 1]\n\n问：你能做什么？\n\n答："), enc(tokenizer, "我可以回答问题。")
    f2 = build_train_features([s], tokenizer, "rounds", len(p2), len(a2) + 2)
    ids2, lab2 = expect(tokenizer, [(p2, False), (a2 + [EOS], True)], len(p2) + len(a2) + 3)
    np.testing.assert_array_equal(f2["input_ids"][0], ids2)
    np.testing.assert_array_equal(f2["labels"][0], lab2)
    # a one-round conversation is exactly the official single-round feature
    one = build_train_features([Sample([Round("你好", "你好！有什么可以帮你？", True)]), Sample([Round("你好", "你好！有什么可以帮你？")])],
                               tokenizer, "official", 64, 64)
    np.testing.assert_array_equal(one["input_ids"][0], one["input_ids"][1])


def test_messages_loss_only_on_trained_assistant_turns(tokenizer):
    s = Sample([Round("北京天气如何？", "晴。", True), Round("Thanks!", "You're welcome.", False)], preamble="你是一个助手。")
    f = build_train_features([s], tokenizer, "official", 64, 64)
    ids, lab = expect(tokenizer, [(tokenizer.encode("[Round 1]\n\n问：你是一个助手。\n\n北京天气如何？\n\n答："), False),
                                  (enc(tokenizer, "晴。"), True),
                                  (enc(tokenizer, "\n\n[Round 2]\n\n问：Thanks!\n\n答："), False),
                                  (enc(tokenizer, "You're welcome.") + [EOS], False)], 129)
    np.testing.assert_array_equal(f["input_ids"][0], ids)
    np.testing.assert_array_equal(f["labels"][0], lab)


def test_plain_text_loss_on_all_tokens(tokenizer):
    text = "春眠不觉晓，处处闻啼鸟。The quick brown fox."
    f = build_train_features([Sample(text=text)], tokenizer, "official", 8, 8)
    body = enc(tokenizer, text)[:17 - 3] + [EOS]
    ids, lab = expect(tokenizer, [(tokenizer.prefix_tokens, False), (body, True)], 17)
    np.testing.assert_array_equal(f["input_ids"][0], ids)
    np.testing.assert_array_equal(f["labels"][0], lab)


def test_eval_features_left_padded(tokenizer):
    samples = load_samples(ADGEN_DIR / "dev.json")[:5]
    e = build_eval_features(samples, tokenizer, "official", 64)
    prompts = [f"[Round 1]\n\n问：{s.rounds[0].query}\n\n答：" for s in samples]
    ref = tokenizer(prompts, padding="max_length", max_length=64, truncation=True, return_tensors="np")
    for k in ("input_ids", "attention_mask", "position_ids"):
        np.testing.assert_array_equal(e[k], ref[k])
    assert e["answers"] == [s.rounds[0].response for s in samples]
    e2 = build_eval_features(samples, tokenizer, "official", 64, padding="longest")
    assert e2["input_ids"].shape[1] == max(min(len(tokenizer.encode(p)), 64) for p in prompts)


def test_stats_counts_truncation(tokenizer):
    samples = load_samples(ADGEN_DIR / "train.json")
    st = length_stats(samples, tokenizer, 64, 128)
    P = [len(tokenizer.encode(f"[Round 1]\n\n问：{s.rounds[0].query}\n\n答：")) for s in samples]
    A = [len(enc(tokenizer, s.rounds[0].response)) for s in samples]
    assert st["rows"] == 500 and st["prompts_cut"] == sum(p > 64 for p in P)
    assert st["answers_cut"] == sum(a > 128 for a in A)
    assert st["prompt_tokens"][100] == max(P) and st["answer_tokens"][50] == int(np.percentile(A, 50))


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="mode: expected one of official, rounds"):
        build_train_features([], tokenizer, "cut")
    with pytest.raises(ValueError, match="max_source_length"):
        build_train_features([], tokenizer, "official", 0, 10)


def test_eval_rounds_mode_and_messages_file(tmp_path, tokenizer):
    row = {"messages": [{"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": "What is the capital of France?"},
                        {"role": "assistant", "content": "Paris."},
                        {"role": "user", "content": "法国的首都有多少人口？"},
                        {"role": "assistant", "content": "大约两百万。"}]}
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    (s,) = load_samples(path)
    f = build_train_features([s], tokenizer, "official", 128, 64)
    assert f["lengths"][0] < 193
    trained = [int(x) for x in f["labels"][0] if x != IGN]
    assert trained == enc(tokenizer, "Paris.") + enc(tokenizer, "大约两百万。") + [EOS]
    full = tokenizer.encode("[Round 1]\n\n问：Answer briefly.\n\nWhat is the capital of France?\n\n答：Paris.\n\n"
                            "[Round 2]\n\n问：法国的首都有多少人口？\n\n答：")
    e = build_eval_features([s], tokenizer, "official", len(full))
    np.testing.assert_array_equal(e["input_ids"][0], full)
    assert e["answers"] == ["大约两百万。"]
    # rounds mode: the old round goes, the system text moves to the kept round
    short = tokenizer.encode("[Round 1]\n\n问：Answer briefly.\n\n法国的首都有多少人口？\n\n答：")
    e2 = build_eval_features([s], tokenizer, "rounds", len(short) + 2)
    np.testing.assert_array_equal(e2["input_ids"][0], [PAD, PAD] + short)
    np.testing.assert_array_equal(e2["attention_mask"][0], [0, 0] + [1] * len(short))
