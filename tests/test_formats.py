"""Record formats: every format from .jsonl and .json, detection, and the DataError for each kind of bad record
(checked for file, line / record index and field in the message)."""

import json
import random

import pytest

from fastsft.data.formats import DataError
from fastsft.data.sources import detect_file_format, read_documents

WORDS = ["alpha", "beta", "gamma", "delta", "héllo", "wörld", "数据", "x+y=z", "line\nbreak", "tab\there", "quote\""]


def random_text(rng: random.Random, n_words=(1, 6)) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*n_words)))


def random_conversation(rng, turns, system=False):
    messages = [{"role": "system", "content": random_text(rng)}] if system else []
    for _ in range(turns):
        messages += [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
    return messages


def as_record(fmt, messages_or_text):
    """Write a normalized document in format `fmt` (the inverse of normalize_record, written independently)."""
    if fmt == "text":
        return {"text": messages_or_text}
    m = messages_or_text
    system = [x["content"] for x in m if x["role"] == "system"]
    turns = [x for x in m if x["role"] != "system"]
    if fmt == "messages":
        return {"messages": m, "id": 7}  # extra keys are ignored
    if fmt == "sharegpt":
        speaker = {"user": "human", "assistant": "gpt", "system": "system"}
        return {"conversations": [{"from": speaker[x["role"]], "value": x["content"]} for x in m]}
    record = {"system": system[0]} if system else {}
    if fmt == "alpaca":
        return {**record, "instruction": turns[0]["content"], "output": turns[1]["content"]}
    return {**record, "prompt": turns[0]["content"], "completion": turns[1]["content"]}


def write(path, records, blank_lines=False):
    if path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False))
    else:
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
        sep = "\n\n  \n" if blank_lines else "\n"
        path.write_text(sep.join(lines) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt", "prompt-completion", "text"])
def test_each_format_round_trips(tmp_path, fmt, suffix):
    rng = random.Random(f"{fmt}{suffix}")
    docs = []
    for i in range(12):
        if fmt == "text":
            docs.append(random_text(rng, (1, 20)))
        elif fmt in ("alpaca", "prompt-completion"):
            docs.append(random_conversation(rng, 1, system=i % 3 == 0))
        else:
            docs.append(random_conversation(rng, rng.randint(1, 3), system=i % 2 == 0))
    path = write(tmp_path / f"data{suffix}", [as_record(fmt, d) for d in docs], blank_lines=True)
    assert detect_file_format(path) == fmt
    got = list(read_documents(path))
    assert [d for _, _, d in got] == docs
    if suffix == ".json":
        assert [r for _, r, _ in got] == list(range(12))
    else:
        assert [line for line, _, _ in got] == [1 + 3 * i for i in range(12)]  # blank lines skipped, still counted


def test_alpaca_input_joins_instruction():
    from fastsft.data.formats import normalize_record

    doc = normalize_record({"instruction": "Sort.", "input": "cba", "output": "abc", "system": "S"}, "alpaca")
    assert doc == [{"role": "system", "content": "S"}, {"role": "user", "content": "Sort.\n\ncba"},
                   {"role": "assistant", "content": "abc"}]
    doc = normalize_record({"instruction": "Hi", "input": "", "output": "yo"}, "alpaca")
    assert doc[0] == {"role": "user", "content": "Hi"}


def test_sharegpt_roles_and_system_key():
    from fastsft.data.formats import normalize_record

    rec = {"system": "be brief", "conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"},
                                                   {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}
    assert [m["role"] for m in normalize_record(rec, "sharegpt")] == ["system", "user", "assistant", "user", "assistant"]


def test_detection_is_per_file_and_skips_leading_bad_lines(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"text": "hello"}])
    b = tmp_path / "b.jsonl"
    b.write_text('{"broken": \n' + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert detect_file_format(a) == "text"
    assert detect_file_format(b) == "prompt-completion"
    c = write(tmp_path / "c.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: cannot detect the format.*answer, question"):
        detect_file_format(c)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n" + '{"text": "unterminated}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON") as info:
        list(read_documents(path))
    assert info.value.line == 3 and info.value.path.endswith("bad.jsonl")


@pytest.mark.parametrize("record, field, problem", [
    ({"instruction": "i"}, "output", "missing"),
    ({"instruction": "i", "output": 5}, "output", "must be a string, got a number"),
    ({"instruction": "i", "output": "o", "input": ["x"]}, "input", "must be a string, got a list"),
])
def test_alpaca_field_errors_name_the_field(tmp_path, record, field, problem):
    path = write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, record])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: field '{field}': {problem}"):
        list(read_documents(path))


def test_messages_errors(tmp_path):
    good = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    cases = [
        ({"messages": [{"role": "bot", "content": "x"}]}, r"field 'messages\[0\]\.role': unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": None}]}, r"field 'messages\[0\]\.content': must be a string or a list of text parts, got null"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "field 'messages': conversation has no assistant"),
        ({"messages": "hi"}, "field 'messages': must be a list"),
        ({"messages": [["user", "x"]]}, r"field 'messages\[0\]': a turn must be a JSON object"),
        ({"text": "not a conversation"}, "field 'messages': missing"),
        ([1, 2], "a record must be a JSON object, got a list"),
    ]
    for i, (bad, message) in enumerate(cases):
        path = write(tmp_path / f"m{i}.jsonl", [good, good, bad])
        with pytest.raises(DataError, match=rf"m{i}\.jsonl:3: {message}"):
            list(read_documents(path, "messages"))


def test_sharegpt_unknown_speaker(tmp_path):
    path = write(tmp_path / "s.json", [{"conversations": [{"from": "human", "value": "a"}, {"from": "bard", "value": "b"}]}])
    with pytest.raises(DataError, match=r"s\.json: record 0, line 2: field 'conversations\[1\]\.from': unknown speaker"):
        list(read_documents(path))


def test_json_list_errors(tmp_path):
    records = [{"text": "a"}, {"text": "b"}, {"txt": "c"}]
    path = write(tmp_path / "l.json", records)
    with pytest.raises(DataError, match=r"l\.json: record 2, line \d+: field 'text': missing"):
        list(read_documents(path))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"text": "a"},\n {"text": "b",,}\n]')
    with pytest.raises(DataError, match=r"broken\.json: record 1, line 3: malformed JSON"):
        list(read_documents(broken))
    single = tmp_path / "single.json"
    single.write_text('{"text": "a"}')
    with pytest.raises(DataError, match="must hold a list of records"):
        list(read_documents(single))
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type '\.csv'"):
        list(read_documents(other))


def test_data_error_survives_pickling():
    import pickle

    err = DataError("missing", "f.jsonl", line=4, field="output")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) == "f.jsonl:4: field 'output': missing"
    assert (back.path, back.line, back.field) == ("f.jsonl", 4, "output")


def test_byte_order_mark_and_crlf(tmp_path):
    rng = random.Random()
    texts = [random_text(rng) for _ in range(3)]
    body = "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\r\n"
    (tmp_path / "crlf.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": t} for t in texts]).encode())
    for name in ("crlf.jsonl", "bom.json"):
        assert [d for _, _, d in read_documents(tmp_path / name)] == texts
