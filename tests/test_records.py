"""Tests for kdflow.records: every rule that turns a record into text."""

from __future__ import annotations

import pytest

from kdflow.records import UnrecognisedRecord, record_to_text

# --- format: text -------------------------------------------------------------------------------


def test_text_format_returns_text_unchanged():
    assert record_to_text({"text": "  hello\n", "id": 3}, "text") == "  hello\n"


def test_text_format_missing_key_names_keys_and_rule():
    with pytest.raises(UnrecognisedRecord) as e:
        record_to_text({"body": "x", "id": 1}, "text")
    msg = str(e.value)
    assert "'body'" in msg and "'id'" in msg and "format 'text'" in msg


def test_text_format_wrong_type_says_why():
    with pytest.raises(UnrecognisedRecord, match=r"'text' is an int, not a string"):
        record_to_text({"text": 5}, "text")


# --- format: instruction ------------------------------------------------------------------------


def test_instruction_with_input():
    rec = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    assert record_to_text(rec, "instruction") == "User: Translate.\n\nBonjour\n\nAssistant: Hello"


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": "  \n"}, {"input": None}])
def test_instruction_without_input(extra):
    rec = {"instruction": "Say hi.", "output": "Hi", **extra}
    assert record_to_text(rec, "instruction") == "User: Say hi.\n\nAssistant: Hi"


def test_instruction_missing_output():
    with pytest.raises(UnrecognisedRecord, match=r"no 'output' key.*'instruction'"):
        record_to_text({"instruction": "x"}, "instruction")


def test_instruction_input_wrong_type():
    with pytest.raises(UnrecognisedRecord, match=r"'input' is a list"):
        record_to_text({"instruction": "x", "input": ["a"], "output": "y"}, "instruction")


# --- format: prompt_response --------------------------------------------------------------------


def test_prompt_response():
    rec = {"prompt": "2+2?", "response": "4"}
    assert record_to_text(rec, "prompt_response") == "User: 2+2?\n\nAssistant: 4"


def test_prompt_response_empty_response_is_left_out():
    assert record_to_text({"prompt": "Q", "response": " "}, "prompt_response") == "User: Q"


def test_prompt_response_missing_key():
    with pytest.raises(UnrecognisedRecord, match=r"no 'response' key"):
        record_to_text({"prompt": "Q"}, "prompt_response")


# --- format: messages ---------------------------------------------------------------------------


def test_messages_roles_capitalised_and_joined():
    rec = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "tool", "content": "42"},
            {"role": "function", "content": "done"},
        ]
    }
    assert record_to_text(rec, "messages") == (
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello\n\nTool: 42\n\nFunction: done"
    )


def test_messages_empty_and_null_contents_left_out():
    rec = {
        "messages": [
            {"role": "system", "content": "   "},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": None},
        ]
    }
    assert record_to_text(rec, "messages") == "User: Hi"


def test_messages_content_segments():
    rec = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is"},
                    {"type": "image", "image": "http://example/x.png"},
                    "in this picture?",
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "image"}]},
        ]
    }
    assert record_to_text(rec, "messages") == ("User: What is\nin this picture?\n\nAssistant: A cat.")


def test_messages_text_segment_without_text_is_unrecognised():
    rec = {"messages": [{"role": "user", "content": [{"type": "text"}]}]}
    with pytest.raises(UnrecognisedRecord, match=r"segment 0 has text None"):
        record_to_text(rec, "messages")


def test_sharegpt_from_value():
    rec = {
        "conversations": [
            {"from": "system", "value": "You help."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }
    assert record_to_text(rec, "messages") == "System: You help.\n\nUser: Hi\n\nAssistant: Hello"


def test_mixed_schema_rows_use_the_non_null_keys():
    # Arrow rows of mixed data carry both key pairs, the unused one null.
    rec = {
        "messages": None,
        "conversations": [{"role": None, "content": None, "from": "human", "value": "Hi"}],
    }
    assert record_to_text(rec, "messages") == "User: Hi"


def test_messages_not_a_list():
    with pytest.raises(UnrecognisedRecord, match=r"'messages' is a str, not a list"):
        record_to_text({"messages": "hello"}, "messages")


def test_message_without_role():
    with pytest.raises(UnrecognisedRecord, match=r"message 1 has neither 'role' nor 'from'"):
        record_to_text({"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}, "messages")


def test_messages_missing_key():
    with pytest.raises(UnrecognisedRecord, match=r"no 'messages' or 'conversations' key"):
        record_to_text({"text": "x"}, "messages")


# --- field --------------------------------------------------------------------------------------


def test_field_string():
    assert record_to_text({"body": "the text", "text": "other"}, "auto", field="body") == "the text"


def test_field_overrides_format():
    assert record_to_text({"body": "b", "text": "t"}, "text", field="body") == "b"


def test_field_messages():
    rec = {"chat": [{"role": "user", "content": "Q"}, {"from": "gpt", "value": "A"}]}
    assert record_to_text(rec, field="chat") == "User: Q\n\nAssistant: A"


def test_field_missing_names_field_and_keys():
    with pytest.raises(UnrecognisedRecord) as e:
        record_to_text({"text": "x", "id": 1}, field="body")
    msg = str(e.value)
    assert "no field 'body'" in msg and "'text'" in msg and "'id'" in msg


@pytest.mark.parametrize("value", [3, {"a": "b"}, ["a", "b"], None])
def test_field_wrong_type(value):
    with pytest.raises(UnrecognisedRecord, match=r"field 'body' is .*, not a string or a list"):
        record_to_text({"body": value}, field="body")


# --- auto ---------------------------------------------------------------------------------------


def test_auto_messages_first():
    rec = {"messages": [{"role": "user", "content": "M"}], "text": "T", "prompt": "P", "response": "R"}
    assert record_to_text(rec) == "User: M"


def test_auto_conversations():
    assert record_to_text({"conversations": [{"from": "human", "value": "C"}]}) == "User: C"


def test_auto_instruction_before_prompt_response_and_text():
    rec = {"instruction": "I", "output": "O", "prompt": "P", "response": "R", "text": "T"}
    assert record_to_text(rec) == "User: I\n\nAssistant: O"


def test_auto_prompt_response_before_text():
    assert record_to_text({"prompt": "P", "response": "R", "text": "T"}) == "User: P\n\nAssistant: R"


def test_auto_text():
    assert record_to_text({"text": "T", "title": "other string"}) == "T"


def test_auto_messages_not_a_list_falls_through():
    assert record_to_text({"messages": "not a list", "text": "T"}) == "T"


def test_auto_single_string_field():
    assert record_to_text({"id": 7, "body": "only string", "score": 0.5}) == "only string"


def test_auto_text_not_a_string_uses_single_string_field():
    assert record_to_text({"text": 5, "body": "B"}) == "B"


def test_auto_applied_rule_decides():
    with pytest.raises(UnrecognisedRecord, match=r"'instruction' is an int"):
        record_to_text({"instruction": 3, "output": "x"})


def test_auto_unrecognised_lists_keys_and_rules():
    with pytest.raises(UnrecognisedRecord) as e:
        record_to_text({"a": "x", "b": "y", "n": 1})
    msg = str(e.value)
    assert "'a', 'b', 'n'" in msg
    assert "messages/conversations" in msg and "prompt + response" in msg
    assert "single string-valued field" in msg and "2 string-valued fields, not exactly one" in msg


def test_auto_wrong_types_are_named():
    with pytest.raises(UnrecognisedRecord) as e:
        record_to_text({"text": 1, "messages": {"role": "user"}})
    msg = str(e.value)
    assert "'messages' is a dict, not a list" in msg and "'text' is an int, not a string" in msg
    assert "0 string-valued fields" in msg and "'text', 'messages'" in msg


def test_unrecognised_is_a_value_error():
    assert issubclass(UnrecognisedRecord, ValueError)


def test_unknown_format_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown record format 'markdown'"):
        record_to_text({"text": "x"}, "markdown")


def test_no_whitespace_normalisation():
    rec = {"prompt": "  a\r\n", "response": "b\t"}
    assert record_to_text(rec) == "User:   a\r\n\n\nAssistant: b\t"
