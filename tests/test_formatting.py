"""The prompt format: Gemma chat turns, one <bos> (added by the tokenizer, never by the text)."""
from __future__ import annotations

import pytest

import common
from training import reports

BOS, EOS, PAD = 2, 1, 0

WITH_INPUT = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
EMPTY_INPUT = {"instruction": "Name a prime number.", "input": "", "output": "Seven."}
NONE_INPUT = {"instruction": "Say hi.", "input": None, "output": "Hi!"}
NO_INPUT = {"instruction": "Count to three.", "output": "1, 2, 3"}


def as_batch(records, with_input=True):
    keys = ["instruction", "input", "output"] if with_input else ["instruction", "output"]
    return {key: [record.get(key) for record in records] for key in keys}


def expected(instruction, output, extra=None):
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return (
        f"<start_of_turn>user\n{prompt}<end_of_turn>\n"
        f"<start_of_turn>model\n{output}<end_of_turn>\n"
    )


def test_batch_returns_one_string_per_record():
    records = [WITH_INPUT, EMPTY_INPUT, NONE_INPUT]
    texts = common.formatting_func(as_batch(records))
    assert isinstance(texts, list)
    assert len(texts) == 3
    assert all(isinstance(text, str) for text in texts)
    assert texts == [
        expected("Translate to French.", "Bonjour", "Good morning"),
        expected("Name a prime number.", "Seven."),
        expected("Say hi.", "Hi!"),
    ]


def test_batch_without_input_column():
    texts = common.formatting_func(as_batch([NO_INPUT, EMPTY_INPUT], with_input=False))
    assert texts == [expected("Count to three.", "1, 2, 3"), expected("Name a prime number.", "Seven.")]


def test_single_record_returns_a_string():
    # trl's packed path (ConstantLengthDataset) passes one record and wants one string.
    text = common.formatting_func(dict(WITH_INPUT))
    assert isinstance(text, str)
    assert text == common.formatting_func(as_batch([WITH_INPUT]))[0]
    assert common.formatting_func(dict(NO_INPUT)) == expected("Count to three.", "1, 2, 3")


@pytest.mark.parametrize("record", [WITH_INPUT, EMPTY_INPUT, NONE_INPUT, NO_INPUT], ids=["input", "empty", "none", "missing"])
def test_text_layout(record):
    text = common.formatting_func(dict(record))
    assert not text.startswith("<bos>") and "<bos>" not in text, "the tokenizer adds <bos>; the text must not"
    assert text.startswith("<start_of_turn>user\n")
    user = text.index("<start_of_turn>user")
    instruction = text.index(record["instruction"])
    model = text.index("<start_of_turn>model\n")
    output = text.index(record["output"])
    assert user < instruction < model < output
    assert text.endswith(record["output"] + "<end_of_turn>\n")
    assert text.count("<end_of_turn>") == 2
    if record.get("input"):
        assert instruction < text.index(record["input"]) < model
    else:
        # nothing but the instruction in the user turn: no dangling blank lines
        assert text[user:model] == f"<start_of_turn>user\n{record['instruction']}<end_of_turn>\n"


def test_whitespace_is_trimmed():
    text = common.formatting_func({"instruction": "  Hi \n", "input": "  \n ", "output": "\n Yo  "})
    assert text == expected("Hi", "Yo")


def test_format_prompt_is_the_start_of_format_record():
    prompt = common.format_prompt(WITH_INPUT)
    assert prompt.endswith("<start_of_turn>model\n")
    assert common.format_record(WITH_INPUT).startswith(prompt)


@pytest.mark.parametrize("record, reference", [
    ({"instruction": "Add 2 and 2.", "input": "", "output": " 4 \n"}, "4"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello "},
                   {"role": "user", "content": "Name?"}, {"role": "assistant", "content": " Gemma"}]}, "Gemma"),
    ({"text": "abcdef"}, "def"),
])
def test_the_reference_answer_is_what_follows_the_prompt_in_the_data(record, reference):
    assert reports.reference_answer(record) == reference
    if "text" in record:
        assert common.format_prompt(record) + reference == record["text"]


def test_tokenized_text_has_exactly_one_bos(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (PAD, EOS, BOS)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for record in (WITH_INPUT, NO_INPUT):
        ids = tokenizer(common.formatting_func(dict(record)))["input_ids"]  # special tokens on, as trl does
        assert ids[0] == BOS
        assert ids.count(BOS) == 1
        # chat markers are single special tokens, not spelled out in pieces
        assert ids.count(tokenizer.convert_tokens_to_ids("<start_of_turn>")) == 2
        assert ids.count(tokenizer.convert_tokens_to_ids("<end_of_turn>")) == 2
