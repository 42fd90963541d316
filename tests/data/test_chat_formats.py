"""Conversation formats: detection, conversion, one-line errors naming the row and the field."""

import json
import subprocess
import sys

import pytest

from sakd.data.chat_formats import (Conversation, detect_format, read_conversations, source_format, to_messages)
from sakd.errors import UserError
from tests.conftest import ROOT, assert_user_error, tiny_overrides

WANT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}]
ROWS = {
    "messages": {"messages": WANT},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                                   {"from": "gpt", "value": "Hello."}]},
    "prompt_completion": {"prompt": [WANT[0], WANT[1]], "completion": [WANT[2]]},
}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_every_format_reads_to_the_same_messages(tmp_path, fmt):
    src = _jsonl(tmp_path / "d.jsonl", [ROWS[fmt]] * 3)
    assert source_format(src, "auto") == fmt
    assert read_conversations(src, fmt) == [WANT] * 3


def test_prompt_completion_strings_and_text_detection(tmp_path):
    assert to_messages({"prompt": "Hi?", "completion": "Hello."}, "prompt_completion", "x") == WANT[1:]
    assert source_format(_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}]), "auto") == "text"
    assert source_format("sakd:shakespeare-train", "auto") == "text"
    assert source_format("sakd:shakespeare-chat-train", "auto") == "messages"
    with pytest.raises(UserError, match="set data.format"):
        detect_format(["messages", "conversations"], "f row 1")


def test_parquet_and_save_to_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([ROWS["sharegpt"]] * 2)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))
    for src in (str(tmp_path / "d.parquet"), str(tmp_path / "disk")):
        assert source_format(src, "auto") == "sharegpt"
        assert read_conversations(src, "sharegpt") == [WANT] * 2


@pytest.mark.parametrize("row,fragment", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "row 2: field messages[1].role"),
    ({"messages": [{"role": "user"}]}, "row 2: field messages[0] has no 'content'"),
    ({"messages": [{"role": "user", "content": 3}]}, "row 2: field messages[0].content is int"),
    ({"messages": "hello"}, "row 2: field 'messages' is str"),
    ({"text": "x"}, "row 2: no field 'messages'"),
])
def test_malformed_rows_name_row_and_field(tmp_path, row, fragment):
    src = _jsonl(tmp_path / "d.jsonl", [ROWS["messages"], row])
    with pytest.raises(UserError) as e:
        read_conversations(src, "messages")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_held_out_conversation_is_a_string_of_its_contents():
    c = Conversation(WANT)
    assert c == "Be brief.\nHi?\nHello." and c.messages == WANT


def test_cli_malformed_row_is_one_line_error(tiny_assets, tmp_path):
    src = _jsonl(tmp_path / "chat.jsonl", [ROWS["messages"], {"messages": [{"role": "user", "content": None}]}])
    args = tiny_overrides(tiny_assets, tmp_path / "out", **{"data.source": src, "data.eval_source": src})
    r = subprocess.run([sys.executable, "-m", "sakd.cli", "distill", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert_user_error(r, "row 2", "messages[0].content")
