"""Every input format, JSON Lines / arrays / BOM, bad-row reports."""
import json

import pytest

from glm_common.data import DataError, Round, detect_format, load_samples, read_samples
from glm_common.data.formats import TOOLS_HEADER
from tests.conftest import ADGEN_DIR


def write_jsonl(path, rows, bom=False):
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_adgen_fixture_detected_and_complete():
    samples, bad, fmt = read_samples(ADGEN_DIR / "train.json")
    assert (fmt, len(samples), bad) == ("adgen", 500, [])
    first = json.loads((ADGEN_DIR / "train.json").read_text(encoding="utf-8").splitlines()[0])
    assert samples[0].rounds == [Round(first["content"], first["summary"], True)]
    assert samples[0].where.endswith("train.json:1") and samples[499].where.endswith("train.json:500")


@pytest.mark.parametrize("bom", [False, True])
def test_json_array_and_jsonl_give_the_same_samples(tmp_path, bom):
    rows = [{"instruction": "把下面的句子翻译成英文", "input": "今天天气很好。", "output": "The weather is nice today."},
            {"instruction": "Name three primary colors.", "output": "Red, blue and yellow."}]
    a = load_samples(write_jsonl(tmp_path / "a.jsonl", rows, bom))
    arr = tmp_path / "b.json"
    arr.write_bytes((b"\xef\xbb\xbf" if bom else b"") + json.dumps(rows, ensure_ascii=False, indent=2).encode())
    b = load_samples(arr)
    assert [s.rounds for s in a] == [s.rounds for s in b]
    assert a[0].rounds == [Round("把下面的句子翻译成英文\n今天天气很好。", "The weather is nice today.")]
    assert a[1].rounds == [Round("Name three primary colors.", "Red, blue and yellow.")]
    # line numbers of array elements are where each object starts
    assert [s.where.rsplit(":", 1)[1] for s in b] == ["2", "7"]


def test_chat_in_the_loop_history(tmp_path):
    row = {"prompt": "那上海呢？", "response": "上海今天多云，气温 18 度。",
           "history": [["北京今天天气怎么样？", "北京今天晴，气温 20 度。"]]}
    (s,) = load_samples(write_jsonl(tmp_path / "c.json", [row]))
    assert detect_format(row) == "chat"
    assert s.rounds == [Round("北京今天天气怎么样？", "北京今天晴，气温 20 度。", False),
                        Round("那上海呢？", "上海今天多云，气温 18 度。", True)]
    assert s.single_target and s.history() == [("北京今天天气怎么样？", "北京今天晴，气温 20 度。")]


def test_session_multi_turn(tmp_path):
    row = {"prompt": ["Hi, who are you?", "你能做什么？"], "response": ["I am ChatGLM2.", "我可以回答问题、写作和翻译。"]}
    (s,) = load_samples(write_jsonl(tmp_path / "s.json", [row]))
    assert detect_format(row) == "session"
    assert s.rounds == [Round("Hi, who are you?", "I am ChatGLM2.", True), Round("你能做什么？", "我可以回答问题、写作和翻译。", True)]
    assert not s.single_target


def test_context_target_and_text(tmp_path):
    (s,) = load_samples(write_jsonl(tmp_path / "ct.json", [{"context": "Instruction: 介绍一下长城\nAnswer: ",
                                                            "target": "长城是中国古代的军事防御工程。"}]))
    assert s.rounds == [Round("Instruction: 介绍一下长城\nAnswer: ", "长城是中国古代的军事防御工程。")]
    txt = tmp_path / "corpus.txt"
    txt.write_text("春眠不觉晓，处处闻啼鸟。\n\nThe quick brown fox jumps over the lazy dog.\n", encoding="utf-8")
    samples = load_samples(txt)
    assert [s.text for s in samples] == ["春眠不觉晓，处处闻啼鸟。", "The quick brown fox jumps over the lazy dog."]
    assert [s.where.rsplit(":", 1)[1] for s in samples] == ["1", "3"]


def test_messages_mapping(tmp_path):
    tools = [{"name": "get_weather", "description": "查询天气", "parameters": {"city": "string"}}]
    row = {"tools": tools, "messages": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "北京天气如何？"},
        {"role": "assistant", "content": "get_weather\n{\"city\": \"北京\"}"},
        {"role": "observation", "content": "{\"temperature\": 20, \"sky\": \"sunny\"}"},
        {"role": "assistant", "content": "北京今天晴，20 度。"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome.", "loss": False}]}
    (s,) = load_samples(write_jsonl(tmp_path / "m.jsonl", [row]))
    assert s.preamble == "你是一个乐于助人的助手。\n\n" + TOOLS_HEADER + json.dumps(tools, ensure_ascii=False)
    assert s.rounds == [Round("北京天气如何？", "get_weather\n{\"city\": \"北京\"}", True),
                        Round("{\"temperature\": 20, \"sky\": \"sunny\"}", "北京今天晴，20 度。", True),
                        Round("Thanks!", "You're welcome.", False)]
    assert s.history()[0][0] == s.preamble + "\n\n北京天气如何？"      # preamble before the first query
    # with old rounds dropped the preamble moves to the first kept round
    assert s.history(1)[0][0] == s.preamble + "\n\n{\"temperature\": 20, \"sky\": \"sunny\"}"
    assert s.query(2) == s.preamble + "\n\nThanks!" and s.query(0) == "Thanks!"


BAD_ROWS = [
    ('{"content": "类型#裙", "summary": "好看"', "invalid JSON"),
    ('{"content": "类型#裙"}', "missing field 'summary'"),
    ('{"content": 3, "summary": "好看"}', "field 'content' must be a string, got int"),
    ('{"content": "类型#裙", "summary": "  "}', "field 'summary' is empty"),
    ('["content", "summary"]', "expected a JSON object, got list"),
]


def test_bad_rows_reported_with_file_and_line(tmp_path):
    good = '{"content": "类型#裤*颜色#黑色", "summary": "黑色的裤子很显瘦。"}'
    path = tmp_path / "train.json"
    path.write_text("\n".join([good] + [r for r, _ in BAD_ROWS] + [good]) + "\n", encoding="utf-8")
    samples, bad, fmt = read_samples(path)
    assert fmt == "adgen" and len(samples) == 2
    assert [(b.line, b.file) for b in bad] == [(i + 2, str(path)) for i in range(len(BAD_ROWS))]
    for b, (_, what) in zip(bad, BAD_ROWS):
        assert what in b.message and str(b).startswith(f"{path}:{b.line}: ")
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON.*and 4 more bad rows"):
        load_samples(path)


def test_skip_reports_count(tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_text('{"content": "a", "summary": "b"}\n{"content": "a"}\n', encoding="utf-8")
    assert len(load_samples(path, on_error="skip")) == 1
    assert f"{path}: skipped 1 bad rows" in capsys.readouterr().err


@pytest.mark.parametrize("row, what", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "ends without an assistant answer"),
    ({"messages": [{"role": "assistant", "content": "hello"}]}, "assistant message before any user message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "assistant content is empty"),
    ({"prompt": ["a", "b"], "response": ["x"]}, "'prompt' has 2 rounds but 'response' has 1"),
    ({"prompt": "q", "response": "a", "history": [["only one"]]}, "history[0] must be a [query, response] pair"),
])
def test_bad_conversations(tmp_path, row, what):
    _, bad, _ = read_samples(write_jsonl(tmp_path / "x.json", [row]))
    assert len(bad) == 1 and what in bad[0].message and bad[0].line == 1


def test_unknown_keys_and_encoding(tmp_path):
    p = write_jsonl(tmp_path / "u.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"u.json:1: cannot tell the data format from the keys \['answer', 'question'\]"):
        load_samples(p)
    g = tmp_path / "gbk.json"
    g.write_bytes('{"content": "你好", "summary": "好"}\n'.encode("gbk"))
    with pytest.raises(DataError, match=r"gbk.json:1: not UTF-8"):
        load_samples(g)
    with pytest.raises(DataError, match="no such file"):
        load_samples(tmp_path / "missing.json")
    # a named format overrides detection
    assert load_samples(write_jsonl(tmp_path / "n.json", [{"text": "hello"}]), format="text")[0].text == "hello"


def test_broken_json_array_names_the_line(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text('[\n  {"context": "a", "target": "b"},\n  {"context": "c", "target": }\n]\n', encoding="utf-8")
    samples, bad, fmt = read_samples(p)
    assert fmt == "context_target" and len(samples) == 1
    assert [str(b) for b in bad] == [f"{p}:3: invalid JSON: Expecting value (column 30)"]
