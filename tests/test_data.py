"""Dataset reading and encoding: what the trainer relies on."""

from __future__ import annotations

import json

import pytest

from adapterhub.data import IGNORE_INDEX, Record, collate, encode_example, read_jsonl
from adapterhub.errors import DatasetError
from adapterhub.tokenizer import build_char_tokenizer


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a =", "completion": " b"}\n\n{"prompt": "", "completion": "c"}\n')
    assert read_jsonl(path) == [Record("a =", " b"), Record("", "c")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('["a", "b"]', "expected an object"),
        ('{"prompt": "a"}', "'completion' must be a string"),
        ('{"prompt": 3, "completion": "x"}', "'prompt' must be a string"),
        ('{"prompt": "a", "completion": ""}', "'completion' is empty"),
    ],
)
def test_malformed_line_names_its_number(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "p", "completion": "c"})
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(DatasetError, match=rf"d\.jsonl:3: .*{message}"):
        read_jsonl(path)


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no records"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_encoding_masks_prompt_and_ends_with_eos():
    tok = build_char_tokenizer()
    ids, labels = encode_example(tok, Record("ab =", " c"), max_length=64)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "ab = c"
    n_prompt = 1 + 4
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    batch = collate([(ids, labels), (ids[:3], labels[:3])], tok.pad_token_id)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * (len(ids) - 3)
    assert (batch["labels"][1, 3:] == IGNORE_INDEX).all()
