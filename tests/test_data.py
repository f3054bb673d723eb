"""Data loading: both shapes through the chat template, loss on answers only, clear errors."""

from __future__ import annotations

import json

import pytest

from adapterhub.data import IGNORE_INDEX, load_dataset, read_examples, render_prompt
from adapterhub.errors import DataError


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def answer_text(tokenizer, item):
    return tokenizer.decode([t for t, l in zip(item["input_ids"], item["labels"]) if l != IGNORE_INDEX])


def test_instruction_shape_is_a_user_and_assistant_turn(tmp_path, tiny_tokenizer):
    path = write(tmp_path, [{"instruction": "add", "input": "1 2", "output": "3"}])
    item = load_dataset(path, tiny_tokenizer)[0]
    assert answer_text(tiny_tokenizer, item) == "3<|end|>\n"
    prompt = render_prompt(tiny_tokenizer, [{"role": "user", "content": "add\n\n1 2"}])
    prompt_ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert item["input_ids"][: len(prompt_ids)] == prompt_ids  # serving builds prompts the same way
    assert all(l == IGNORE_INDEX for l in item["labels"][: len(prompt_ids)])


def test_chat_shape_learns_every_assistant_turn(tmp_path, tiny_tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    item = load_dataset(write(tmp_path, [{"messages": messages}]), tiny_tokenizer)[0]
    assert answer_text(tiny_tokenizer, item) == "hello<|end|>\nciao<|end|>\n"
    full = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny_tokenizer.decode(item["input_ids"]) == full


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"instruction": "x"}, "'output' must be a string"),
        ({"instruction": 3, "output": "y"}, "'instruction' must be a string"),
        ({"instruction": "x", "output": ""}, "'output' is empty"),
        ({"prompt": "x", "completion": "y"}, "unknown example shape"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message must be from the assistant"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "robot"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}, "messages\\[0\\]"),
    ],
)
def test_bad_line_names_file_line_and_reason(tmp_path, line, reason):
    path = write(tmp_path, [{"instruction": "ok", "output": "fine"}, line])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{reason}"):
        read_examples(path)


def test_empty_missing_and_binary_files(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        read_examples(write(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl")
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b'{"instruction": "\xff\xfe", "output": "x"}\n')
    with pytest.raises(DataError, match=r"bin\.jsonl:1: not UTF-8"):
        read_examples(bad)


def test_prompt_longer_than_max_length_is_an_error_not_a_silent_drop(tmp_path, tiny_tokenizer):
    path = write(tmp_path, [{"instruction": "x" * 200, "output": "y"}])
    with pytest.raises(DataError, match="no answer tokens within max_length=64"):
        load_dataset(path, tiny_tokenizer, max_length=64)


def test_eval_split_is_deterministic_and_disjoint(tmp_path, tiny_tokenizer):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    ds = load_dataset(write(tmp_path, rows), tiny_tokenizer)
    train, evals = ds.split(0.25, seed=3)
    again, _ = ds.split(0.25, seed=3)
    assert len(evals) == 5 and len(train) == 15
    assert [x["input_ids"] for x in train] == [x["input_ids"] for x in again]
    assert not {tuple(x["input_ids"]) for x in train} & {tuple(x["input_ids"]) for x in evals}
