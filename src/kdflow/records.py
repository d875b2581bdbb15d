"""How a data record (a JSON object, a Parquet row, a dataset example) becomes one training text.

``record_to_text(record, fmt="auto", field=None)`` applies these rules; a record that none of them
fits raises :class:`UnrecognisedRecord`, whose message lists the keys the record had and the rules
that were tried. The caller counts such records and leaves them out.

``field`` set (``data.sources[].field``)
    ``record[field]`` must exist. A string is the text as is; a list of message dicts is rendered
    as a chat (below); anything else is unrecognised. ``format`` is not consulted.

``format: text``
    ``record["text"]``, which must be a string.

``format: instruction``
    Keys ``instruction``, ``output`` and optionally ``input`` (strings; ``input`` may also be
    missing or null). Rendered as the chat ``user: instruction`` (followed by a blank line and
    ``input`` when ``input`` is not empty after stripping), ``assistant: output``.

``format: prompt_response``
    Keys ``prompt`` and ``response`` (strings), rendered as the chat ``user: prompt``,
    ``assistant: response``.

``format: messages``
    Key ``messages`` (or, if there is none, ``conversations``): a list of messages. A message is
    ``{"role": ..., "content": ...}`` or, ShareGPT style, ``{"from": ..., "value": ...}`` where
    ``human`` means user and ``gpt`` means assistant. The content is a string, null (an empty
    message), or a list of segments: each segment a string or a dict with a string ``text`` key;
    segment dicts without text whose ``type`` is not ``"text"`` (images, audio, ...) are left
    out. The text segments of one message are joined with a newline.

``format: auto`` (the default): the first of these that applies
    1. ``messages`` or ``conversations`` holds a list -> as ``messages``;
    2. keys ``instruction`` and ``output`` -> as ``instruction``;
    3. keys ``prompt`` and ``response`` -> as ``prompt_response``;
    4. ``text`` holds a string -> that string;
    5. exactly one field of the record holds a string -> that string;
    otherwise the record is unrecognised. Once a rule applies, its own checks decide: for example
    ``{"instruction": 3, "output": "x"}`` is unrecognised, not passed on to rule 5.

Chat rendering does not depend on any tokenizer's chat template, so the same data gives the same
text for every teacher and student. Each message becomes ``"{Role}: {content}"``, with the role
capitalised (``System``, ``User``, ``Assistant``, ``Tool``, or any other role as given with its
first letter upper-cased), and the messages are joined by a blank line (``"\\n\\n"``). Messages
whose content is empty after stripping are left out; a chat with no message left gives ``""``.

Text is otherwise taken exactly as stored: no whitespace is stripped or normalised, and empty
texts are returned as they are (the caller drops them by ``data.min_chars``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FORMATS = ("auto", "text", "instruction", "prompt_response", "messages")

# ShareGPT speaker names; roles not listed here pass through unchanged.
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}

_AUTO_RULES = (
    "messages/conversations (a list)",
    "instruction + output",
    "prompt + response",
    "text (a string)",
    "a single string-valued field",
)


class UnrecognisedRecord(ValueError):
    """A record that no rule of :func:`record_to_text` turns into text; the message says why."""


def _keys(record: Mapping[str, Any]) -> str:
    return "[" + ", ".join(repr(k) for k in record) + "]"


def _fail(record: Mapping[str, Any], rules: str, reason: str) -> UnrecognisedRecord:
    return UnrecognisedRecord(f"{reason} (record keys: {_keys(record)}; rules tried: {rules})")


def _type_name(value: Any) -> str:
    """The JSON-ish type of ``value`` with its article, for messages: "an int", "a str", "null"."""
    if value is None:
        return "null"
    name = type(value).__name__
    return ("an " if name[0] in "aeiou" else "a ") + name


def record_to_text(record: Mapping[str, Any], fmt: str = "auto", field: str | None = None) -> str:
    """Return the training text of ``record`` by the rules in this module's docstring.

    Raises :class:`UnrecognisedRecord` when no rule applies or the values have the wrong types,
    and ``ValueError`` for an unknown ``fmt``.
    """
    if not isinstance(record, Mapping):
        raise UnrecognisedRecord(f"record is {_type_name(record)}, not an object")
    if field is not None:
        return _from_field(record, field)
    if fmt == "auto":
        return _auto(record)
    if fmt == "text":
        return _text(record, "format 'text'")
    if fmt == "instruction":
        return _instruction(record, "format 'instruction'")
    if fmt == "prompt_response":
        return _prompt_response(record, "format 'prompt_response'")
    if fmt == "messages":
        return _messages(record, "format 'messages'")
    raise ValueError(f"unknown record format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _render_chat(messages: Sequence[Any]) -> str:
    """Render a list of chat messages as ``"Role: content"`` blocks joined by blank lines.

    Raises :class:`UnrecognisedRecord` (without record context) for a malformed message.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise UnrecognisedRecord(f"messages are {_type_name(messages)}, not a list")
    blocks = []
    for i, message in enumerate(messages):
        role, content = _role_and_content(message, i)
        if content.strip():
            blocks.append(f"{role[:1].upper()}{role[1:]}: {content}")
    return "\n\n".join(blocks)


def _role_and_content(message: Any, i: int) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise UnrecognisedRecord(f"message {i} is {_type_name(message)}, not an object")
    # Parquet/Arrow rows of mixed data carry both key pairs, the unused one null.
    if message.get("role") is not None or ("role" in message and message.get("from") is None):
        role, content = message["role"], message.get("content")
    elif "from" in message:
        role, content = message["from"], message.get("value")
        if isinstance(role, str):
            role = _SHAREGPT_ROLES.get(role, role)
    else:
        raise UnrecognisedRecord(f"message {i} has neither 'role' nor 'from' (message keys: {_keys(message)})")
    if not isinstance(role, str) or not role:
        raise UnrecognisedRecord(f"message {i} has role {role!r}, not a non-empty string")
    return role, _content_text(content, i)


def _content_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
        raise UnrecognisedRecord(f"message {i} content is {_type_name(content)}, not a string or a list of segments")
    parts = []
    for j, segment in enumerate(content):
        if isinstance(segment, str):
            parts.append(segment)
        elif isinstance(segment, Mapping):
            text = segment.get("text")
            if isinstance(text, str):
                parts.append(text)
            elif text is not None or segment.get("type") == "text":
                raise UnrecognisedRecord(f"message {i} content segment {j} has text {text!r}, not a string")
            # Otherwise a non-text segment (an image, audio...): nothing to train on.
        else:
            raise UnrecognisedRecord(
                f"message {i} content segment {j} is {_type_name(segment)}, not a string or an object"
            )
    return "\n".join(parts)


def _from_field(record: Mapping[str, Any], field: str) -> str:
    rules = f"field {field!r}"
    if field not in record:
        raise _fail(record, rules, f"the record has no field {field!r}")
    value = record[field]
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        if all(isinstance(m, Mapping) for m in value):
            try:
                return _render_chat(value)
            except UnrecognisedRecord as e:
                raise _fail(record, rules, f"field {field!r}: {e}") from None
    raise _fail(
        record,
        rules,
        f"field {field!r} is {_type_name(value)}, not a string or a list of messages",
    )


def _text(record: Mapping[str, Any], rules: str) -> str:
    if "text" not in record:
        raise _fail(record, rules, "the record has no 'text' key")
    value = record["text"]
    if not isinstance(value, str):
        raise _fail(record, rules, f"'text' is {_type_name(value)}, not a string")
    return value


def _require_str(record: Mapping[str, Any], rules: str, keys: tuple[str, ...]) -> list[str]:
    missing = [k for k in keys if k not in record]
    if missing:
        raise _fail(record, rules, "the record has no " + " and no ".join(repr(k) for k in missing) + " key")
    values = []
    for k in keys:
        if not isinstance(record[k], str):
            raise _fail(record, rules, f"{k!r} is {_type_name(record[k])}, not a string")
        values.append(record[k])
    return values


def _instruction(record: Mapping[str, Any], rules: str) -> str:
    instruction, output = _require_str(record, rules, ("instruction", "output"))
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _fail(record, rules, f"'input' is {_type_name(extra)}, not a string")
    user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    return _render_chat([{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def _prompt_response(record: Mapping[str, Any], rules: str) -> str:
    prompt, response = _require_str(record, rules, ("prompt", "response"))
    return _render_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def _messages(record: Mapping[str, Any], rules: str) -> str:
    # Mixed-schema datasets hold null in whichever of the two columns a row does not use.
    if isinstance(record.get("messages"), list):
        key = "messages"
    elif isinstance(record.get("conversations"), list) or "messages" not in record:
        key = "conversations"
    else:
        key = "messages"
    if key not in record:
        raise _fail(record, rules, "the record has no 'messages' or 'conversations' key")
    value = record[key]
    if not isinstance(value, list):
        raise _fail(record, rules, f"{key!r} is {_type_name(value)}, not a list")
    try:
        return _render_chat(value)
    except UnrecognisedRecord as e:
        raise _fail(record, rules, f"{key!r}: {e}") from None


def _auto(record: Mapping[str, Any]) -> str:
    rules = "auto: " + ", then ".join(_AUTO_RULES)
    if isinstance(record.get("messages"), list) or isinstance(record.get("conversations"), list):
        return _messages(record, rules)
    if "instruction" in record and "output" in record:
        return _instruction(record, rules)
    if "prompt" in record and "response" in record:
        return _prompt_response(record, rules)
    if isinstance(record.get("text"), str):
        return record["text"]
    strings = [v for v in record.values() if isinstance(v, str)]
    if len(strings) == 1:
        return strings[0]
    # Name the near misses: a wrongly typed key is the usual cause, and the fix.
    reasons = [
        f"{k!r} is {_type_name(record[k])}, not {want}"
        for k, want in (("messages", "a list"), ("conversations", "a list"), ("text", "a string"))
        if k in record
    ]
    reasons.append(f"{len(strings)} string-valued fields, not exactly one")
    raise _fail(record, rules, "no rule applies: " + "; ".join(reasons))
