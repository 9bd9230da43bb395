"""Record formats for `fastsft prepare`: read .jsonl/.json files and turn each record into one normalized document.

First stage of the data flow (records -> tokenizer -> shards). A normalized document is either
- a conversation: a `Conversation` (a list of {"role": "system"|"user"|"assistant"|"tool", "content": str} with at
  least one assistant turn, plus the record's `tools`), or
- a plain text: a `str`, every token trained.

Formats (detected per file from its first parseable record unless given):
  alpaca             {"instruction", "input"?, "output", "system"?}
  messages           {"messages": [{"role", "content"}, ...], "tools"?}       (OpenAI style)
  sharegpt           {"conversations": [{"from", "value"}, ...], "system"?}   from: human|user|gpt|assistant|system
                                                                              (|function_call|observation|tool)
  prompt-completion  {"prompt", "completion", "system"?}: two strings, or two lists of messages (TRL's
                     conversational prompt/completion; only the completion's assistant turns train), "tools"?
  text               {"text"}

A message (messages, prompt/completion lists) may carry beside role and content:
  content            a string, or a list of text parts [{"type": "text", "text": ...}] (joined), or null for an
                     assistant turn that only calls tools
  reasoning_content  (assistant) the turn's reasoning; the chat template decides how it is rendered
  tool_calls         (assistant) a list of calls, rendered by the chat template; the turn trains as any other
  tool_call_id, name (tool) passed to the template; tool results never train
  train              (assistant) true/false: train this turn or not, whatever --train-on says

Files are read by `fastsft.data.sources` (.jsonl, .json, gzip, parquet, `datasets` folders), record by record; it
also has `read_documents` (a file's documents) and `detect_file_format`.
Every problem is a `DataError` naming the file, the line (and the record index for .json) and the field.
"""

from __future__ import annotations

import json

FORMATS = ("alpaca", "messages", "sharegpt", "prompt-completion", "text")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
# Message keys passed through to the chat template beside role and content.
_MESSAGE_EXTRAS = {"assistant": ("reasoning_content", "tool_calls"), "tool": ("tool_call_id", "name")}


class Conversation(list):
    """A normalized conversation: a list of messages (dicts) with the record's tool definitions in `.tools`."""

    def __init__(self, messages=(), tools=None):
        super().__init__(messages)
        self.tools = tools

    def __reduce__(self):  # keeps .tools across pickling (worker processes)
        return (Conversation, (list(self), self.tools))


# The keys that identify each format, checked in this order (the first match wins).
_DETECT_KEYS = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt-completion", ("prompt", "completion")),
    ("text", ("text",)),
)


class DataError(ValueError):
    """A record (or file) that cannot be used, with where it is: file, line, record index (.json), field."""

    def __init__(self, problem: str, path=None, line: int | None = None, record: int | None = None,
                 field: str | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.line = line
        self.record = record
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.location()
        field = f"field '{self.field}': " if self.field else ""
        return f"{where}: {field}{self.problem}" if where else f"{field}{self.problem}"

    def location(self) -> str:
        if self.path is None:
            return ""
        if self.record is not None:
            line = f", line {self.line}" if self.line is not None else ""
            return f"{self.path}: record {self.record}{line}"
        return f"{self.path}:{self.line}" if self.line is not None else self.path

    def __reduce__(self):  # keeps the fields across process boundaries (workers send errors back)
        return (DataError, (self.problem, self.path, self.line, self.record, self.field))


def detect_format(record: dict) -> str | None:
    """The format whose identifying keys this record has, or None."""
    for name, keys in _DETECT_KEYS:
        if all(k in record for k in keys):
            return name
    return None


# ---------------------------------------------------------------------------------------------- normalizing


def normalize_record(record: dict, fmt: str, path=None, line: int | None = None, record_index: int | None = None):
    """One record of format `fmt` as a conversation (list of role/content dicts) or a plain text (str)."""

    def fail(problem, field):
        raise DataError(problem, path, line=line, record=record_index, field=field)

    def text_field(name, optional=False, obj=record, label=None):
        label = label or name
        if name not in obj or (optional and obj[name] is None):
            if optional:
                return None
            fail(f"missing (a '{fmt}' record needs it)", label)
        value = obj[name]
        if not isinstance(value, str):
            fail(f"must be a string, got {_json_type(value)}", label)
        return value

    if fmt == "text":
        return text_field("text")
    if fmt == "alpaca":
        instruction, extra, output = text_field("instruction"), text_field("input", optional=True), text_field("output")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return _with_system(text_field("system", optional=True), [_msg("user", user), _msg("assistant", output)])
    def turns(list_field, role_field, content_field, role_names, noun):
        """The turns of a chat record as messages; role_names maps each accepted name to its role."""
        messages = []
        for i, turn in enumerate(_turn_list(record, list_field, fail)):
            where = f"{list_field}[{i}]"
            name = text_field(role_field, obj=turn, label=f"{where}.{role_field}")
            if name not in role_names:
                fail(f"unknown {noun} '{name}' (expected one of {', '.join(role_names)})", f"{where}.{role_field}")
            messages.append(_message(turn, role_names[name], content_field, where, fail))
        return messages

    if fmt == "prompt-completion":
        if isinstance(record.get("prompt"), list) or isinstance(record.get("completion"), list):
            roles = {role: role for role in ROLES}
            prompt, completion = turns("prompt", "role", "content", roles, "role"), \
                turns("completion", "role", "content", roles, "role")
            for message in prompt:  # TRL's completion-only loss: the prompt's assistant turns are context
                if message["role"] == "assistant":
                    message.setdefault("train", False)
            if not any(m["role"] == "assistant" for m in completion):
                fail("the completion has no assistant message, so nothing would be trained", "completion")
            return Conversation(_with_system(text_field("system", optional=True), prompt + completion),
                                _tools(record, fail))
        prompt, completion = text_field("prompt"), text_field("completion")
        return _with_system(text_field("system", optional=True), [_msg("user", prompt), _msg("assistant", completion)])
    if fmt == "messages":
        messages = turns("messages", "role", "content", {role: role for role in ROLES}, "role")
        return Conversation(_check_conversation(messages, "messages", fail), _tools(record, fail))
    if fmt == "sharegpt":
        messages = turns("conversations", "from", "value", SHAREGPT_ROLES, "speaker")
        messages = _with_system(text_field("system", optional=True), messages)
        return Conversation(_check_conversation(messages, "conversations", fail), _tools(record, fail))
    raise ValueError(f"unknown format '{fmt}' (expected one of {', '.join(FORMATS)})")


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _message(turn: dict, role: str, content_field: str, where: str, fail) -> dict:
    """One turn as a message: content as a string (text parts joined), plus the extras its role may carry."""
    extras = _MESSAGE_EXTRAS.get(role, ())
    if content_field not in turn and not (role == "assistant" and turn.get("tool_calls")):
        fail("missing", f"{where}.{content_field}")
    content = turn.get(content_field)
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            text = part.get("text") if isinstance(part, dict) else None
            if not isinstance(text, str) or part.get("type", "text") != "text":
                fail("only text parts ({\"type\": \"text\", \"text\": ...}) are supported", f"{where}.{content_field}[{j}]")
            parts.append(text)
        content = "".join(parts)
    elif content is None and role == "assistant" and turn.get("tool_calls"):
        content = ""
    elif not isinstance(content, str):
        fail(f"must be a string or a list of text parts, got {_json_type(content)}", f"{where}.{content_field}")
    message = _msg(role, content)
    for key in extras:
        value = turn.get(key)
        if value is None:
            continue
        if key == "tool_calls" and not isinstance(value, list):
            fail(f"must be a list of calls, got {_json_type(value)}", f"{where}.{key}")
        if key != "tool_calls" and not isinstance(value, str):
            fail(f"must be a string, got {_json_type(value)}", f"{where}.{key}")
        message[key] = value
    if "train" in turn:
        if role != "assistant" or not isinstance(turn["train"], bool):
            fail("must be true or false, on an assistant message (other roles never train)", f"{where}.train")
        message["train"] = turn["train"]
    return message


def _tools(record: dict, fail) -> list | None:
    tools = record.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):  # some datasets store the tool list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            fail("a string that is not JSON; give a list of tool definitions", "tools")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        fail(f"must be a list of tool definitions (objects), got {_json_type(tools)}", "tools")
    return tools or None


def _with_system(system: str | None, messages: list) -> list:
    return ([_msg("system", system)] if system else []) + messages


def _turn_list(record, key, fail) -> list:
    if key not in record:
        fail("missing", key)
    turns = record[key]
    if not isinstance(turns, list):
        fail(f"must be a list of turns, got {_json_type(turns)}", key)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            fail(f"a turn must be a JSON object, got {_json_type(turn)}", f"{key}[{i}]")
    return turns


def _check_conversation(messages, key, fail) -> list:
    if not any(m["role"] == "assistant" for m in messages):
        fail("conversation has no assistant turn, so nothing would be trained", key)
    return messages


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)
