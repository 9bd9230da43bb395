"""Tokenizers for fastsft: the built-in byte tokenizer and local Hugging Face tokenizers, behind one interface.

Second stage of the data flow: a normalized document from `fastsft.data.formats` (a conversation or a plain text)
becomes token ids plus a loss mask, which `fastsft prepare` writes to shards. The trainer, generation and export use
the same objects, so a model is always trained, prompted and exported with one tokenization.

Interface (both kinds):
  vocab_size            ids the model must embed (max id + 1)
  eos_id, pad_id        end of text / padding id
  stop_ids              ids that end generation (eos and the chat template's end-of-turn tokens)
  encode(text)          token ids of plain text, no special tokens
  decode(ids)           text, special tokens written out
  encode_conversation(messages, train_on="all"|"last", template_kwargs=None) -> (ids int32, loss_mask uint8)
                        each trained assistant turn carries loss from after its header through its end-of-turn
                        token; "last" trains only the final assistant turn; a message's "train" flag wins
  encode_documents(document, train_on, template_kwargs, earlier_reasoning) -> [(ids, mask), ...]
  encode_documents_batch(documents, ...) -> per document its [(ids, mask), ...] or its DataError; also in three
                        steps, start_batch -> encode_texts (GIL released) -> finish_batch, for pipelining
  encode_text(text)     (ids, mask) with BOS (when the tokenizer has one) and EOS; every token trained
  prompt_ids(messages)  the conversation plus the opening of an assistant turn, for generation
  identity()            kind, name/path, vocab_size and a content hash (recorded in manifests and caches)
  save_pretrained(dir)  a tokenizer directory `transformers.AutoTokenizer` loads offline

Position 0 never carries loss: no token precedes it, so nothing predicts it.

Hugging Face tokenizers use their chat template, rendered once per conversation with its tools and the template
keyword arguments (e.g. enable_thinking); `fastsft.data.chat_template` finds each assistant turn's region in that
text for any template (no generation markers needed) and checks it, so token ids always equal
`apply_chat_template(..., tokenize=True)` and a turn that cannot be placed is an error, never a guessed mask. A
tokenizer without a chat template gets
`FALLBACK_CHAT_TEMPLATE` ("User:\\n...\\n\\nAssistant:\\n...<eos>"), which `save_pretrained` then saves with it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastsft.data.chat_template import Placement, Probe, ShapeCache, kwargs_key, learn_probe, \
    place_assistant_turns, template_messages
from fastsft.data.formats import Conversation, DataError

TRAIN_ON = ("all", "last")
EARLIER_REASONING = ("template", "keep")

# Byte tokenizer: ids 0..255 are the UTF-8 bytes, then these special tokens in this order.
BYTE_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# For Hugging Face tokenizers that ship no chat template: plain role headers, EOS closes each assistant turn.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% else %}{{ message['role'] | capitalize + ':\\n' + message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)

# Files that define a Hugging Face tokenizer's behaviour (hashed for its identity; model weights are not).
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                       "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def load_tokenizer(spec, chat_template: str | None = None) -> Tokenizer:
    """`"byte"` -> the built-in byte tokenizer; a directory -> its Hugging Face tokenizer (never downloads), with
    `chat_template` (Jinja source) replacing its own when given.

    A Tokenizer passes through unchanged.
    """
    if isinstance(spec, Tokenizer):
        return spec
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--tokenizer '{spec}': not 'byte' and not a directory; give 'byte' or a local Hugging Face "
                         "tokenizer directory (tokenizer.json + tokenizer_config.json). Nothing is downloaded.")
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"--tokenizer '{spec}': no tokenizer.json in this directory; fastsft needs a fast "
                         "(tokenizers-library) Hugging Face tokenizer, saved with save_pretrained.")
    return HFTokenizer(path, chat_template)


class Tokenizer:
    """Shared parts of the two tokenizer kinds (see the module docstring for the interface)."""

    kind = "?"
    vocab_size: int
    eos_id: int
    pad_id: int
    stop_ids: list[int]

    def encode_conversation(self, messages: list[dict], train_on: str = "all",
                            template_kwargs: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def encode_document(self, document, train_on: str = "all", template_kwargs: dict | None = None):
        """A normalized document from `fastsft.data.formats`: a conversation (list) or a plain text (str)."""
        if isinstance(document, str):
            return self.encode_text(document)
        return self.encode_conversation(document, train_on, template_kwargs)

    def encode_documents(self, document, train_on: str = "all", template_kwargs: dict | None = None,
                         earlier_reasoning: str = "template", counts: dict | None = None):
        """The training documents [(ids, mask), ...] one normalized document becomes (more than one only with
        earlier_reasoning="keep", see HFTokenizer); `counts["reasoning_not_rendered"]` counts trained turns whose
        reasoning the template left out."""
        _check_earlier_reasoning(earlier_reasoning)
        return [self.encode_document(document, train_on, template_kwargs)]

    def encode_documents_batch(self, documents, train_on: str = "all", template_kwargs: dict | None = None,
                               earlier_reasoning: str = "template", counts: dict | None = None) -> list:
        """`encode_documents` of each document; a document that cannot be encoded gives its DataError in its place.

        The same as `finish_batch(staged, encode_texts(staged.texts))` with `staged = start_batch(...)`: the three
        steps are apart so that a caller can tokenize one batch (`encode_texts`, which leaves the GIL to the
        tokenizer's threads) while it starts the next."""
        staged = self.start_batch(documents, train_on, template_kwargs, earlier_reasoning, counts)
        return self.finish_batch(staged, self.encode_texts(staged.texts))

    def start_batch(self, documents, train_on: str = "all", template_kwargs: dict | None = None,
                    earlier_reasoning: str = "template", counts: dict | None = None) -> StagedBatch:
        """Everything before tokenizing text: the texts to tokenize, and how to turn their tokens into documents."""
        out = []
        for document in documents:
            try:
                out.append(self.encode_documents(document, train_on, template_kwargs, earlier_reasoning, counts))
            except DataError as e:
                out.append(e)
        return StagedBatch(out, [])

    def encode_texts(self, texts: list[str]) -> list:
        """The tokenizer's encodings of `texts` (none for a tokenizer that has nothing to tokenize apart)."""
        if texts:
            raise NotImplementedError
        return []

    def finish_batch(self, staged: StagedBatch, encodings: list) -> list:
        return staged.items

    def __repr__(self) -> str:
        ident = self.identity()
        return f"{type(self).__name__}({ident.get('path') or ident['name']!r}, vocab_size={self.vocab_size})"


@dataclass
class StagedBatch:
    """A batch of documents up to tokenizing: per document a result, a DataError, or Placements to finish, and the
    placed texts in order (see `Tokenizer.start_batch`)."""

    items: list
    texts: list[str]


def _check_train_on(train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}: expected one of {', '.join(TRAIN_ON)}")


def _finish(ids, mask) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int32)
    mask = np.asarray(mask, dtype=np.uint8)
    if len(mask):
        mask[0] = 0  # nothing precedes position 0, so it can never be a target
    return ids, mask


def _tokens_covering(encoding, start: int, end: int) -> tuple[int, int]:
    """Token range [first, last) of a tokenizers Encoding whose characters overlap the span [start, end).

    Token offsets increase along the text, so the overlapping tokens are contiguous: two char_to_token lookups
    instead of converting every offset. Characters no token covers (a normalizer dropped them) fall back to a scan.
    """
    if end <= start:
        return 0, 0
    first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
    if first is not None and last is not None:
        return first, last + 1
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    inside = np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))
    return (int(inside[0]), int(inside[-1]) + 1) if len(inside) else (0, 0)


def trained_turns(messages: list[dict], train_on: str) -> set[int]:
    """Indices of the assistant messages that carry loss: all of them or the last one (train_on), then each
    message's own "train" flag (true or false) wins."""
    _check_train_on(train_on)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    chosen = set(assistant[-1:] if train_on == "last" else assistant)
    for i in assistant:
        flag = messages[i].get("train")
        if flag is True:
            chosen.add(i)
        elif flag is False:
            chosen.discard(i)
    return chosen


def _check_earlier_reasoning(mode: str) -> None:
    if mode not in EARLIER_REASONING:
        raise ValueError(f"earlier_reasoning={mode!r}: expected one of {', '.join(EARLIER_REASONING)}")


# ---------------------------------------------------------------------------------------------- byte tokenizer


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus role/end-of-turn special tokens; needs no files.

    Chat format (BYTE_CHAT_TEMPLATE): <bos> then per message <|role|> content <|end|>; generation opens <|assistant|>.
    Special tokens are never produced from text: a literal "<|end|>" in content stays bytes.
    """

    kind = "byte"

    def __init__(self):
        self.special_ids = {tok: 256 + i for i, tok in enumerate(BYTE_SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(BYTE_SPECIAL_TOKENS)
        self.pad_id = self.special_ids["<pad>"]
        self.bos_id = self.special_ids["<bos>"]
        self.eos_id = self.special_ids["<eos>"]
        self.end_id = self.special_ids["<|end|>"]
        self.stop_ids = [self.end_id, self.eos_id]
        self.role_ids = {r: self.special_ids[f"<|{r}|>"] for r in ("system", "user", "assistant")}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(BYTE_SPECIAL_TOKENS[i - 256] if i - 256 < len(BYTE_SPECIAL_TOKENS) else f"<|id{i}|>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def encode_conversation(self, messages, train_on="all", template_kwargs=None):
        trained = trained_turns(messages, train_on)
        # Built as numpy pieces (one per header, content and turn end) rather than per-token Python lists.
        pieces, flags, lengths = [np.array([self.bos_id], np.int32)], [0], [1]
        for i, message in enumerate(messages):
            content = np.frombuffer(_byte_content(message).encode("utf-8"), dtype=np.uint8)
            loss = 1 if i in trained else 0
            pieces += [np.array([self.role_ids[message["role"]]], np.int32), content, np.array([self.end_id], np.int32)]
            flags += [0, loss, loss]
            lengths += [1, len(content), 1]
        ids = np.concatenate(pieces, dtype=np.int32)
        return _finish(ids, np.repeat(np.array(flags, np.uint8), lengths))

    def encode_text(self, text):
        content = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        ids = np.concatenate([np.array([self.bos_id], np.int32), content, np.array([self.eos_id], np.int32)],
                             dtype=np.int32)
        return _finish(ids, np.ones(len(ids), dtype=np.uint8))

    def prompt_ids(self, messages, template_kwargs=None) -> list[int]:
        """The byte chat format takes no keyword arguments; any given are ignored, as a Jinja template ignores
        variables it does not use."""
        ids = [self.bos_id]
        for message in messages:
            ids += [self.role_ids[message["role"]], *_byte_content(message).encode("utf-8"), self.end_id]
        return ids + [self.role_ids["assistant"]]

    def identity(self) -> dict:
        definition = json.dumps({"specials": BYTE_SPECIAL_TOKENS, "template": BYTE_CHAT_TEMPLATE})
        return {"kind": "byte", "name": "byte", "vocab_size": self.vocab_size,
                "hash": hashlib.sha256(definition.encode()).hexdigest()}

    def save_pretrained(self, directory) -> None:
        """Write tokenizer.json + tokenizer_config.json that AutoTokenizer loads offline with identical ids."""
        _byte_hf_tokenizer().save_pretrained(str(directory))


def _byte_content(message: dict) -> str:
    """A message's text in the byte chat format: reasoning goes first as a think block; tools are not supported."""
    if message["role"] not in ("system", "user", "assistant") or message.get("tool_calls"):
        raise DataError("the byte tokenizer's chat format has no tool messages or tool calls; use a Hugging Face "
                        "tokenizer whose chat template supports tools", field="messages")
    reasoning = message.get("reasoning_content")
    content = message["content"] or ""
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{content}" if reasoning else content


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map that byte-level BPE (the tokenizers ByteLevel pre-tokenizer) uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_hf_tokenizer():
    """The byte tokenizer as a PreTrainedTokenizerFast: byte-level BPE with no merges, so byte b is id b."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rust.decoder = decoders.ByteLevel()
    rust.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
    for i, tok in enumerate(BYTE_SPECIAL_TOKENS):
        assert rust.token_to_id(tok) == 256 + i, "special tokens must follow the 256 bytes in order"
    bos = ("<bos>", BYTE_SPECIAL_TOKENS.index("<bos>") + 256)  # add_special_tokens=True prepends <bos>, as Llama does
    rust.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   chat_template=BYTE_CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------- Hugging Face


class HFTokenizer(Tokenizer):
    """A local Hugging Face (fast) tokenizer directory, with its chat template or FALLBACK_CHAT_TEMPLATE."""

    kind = "hf"

    def __init__(self, path, chat_template: str | None = None):
        from transformers import AutoTokenizer

        self.path = Path(path).resolve()
        try:
            self.tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as e:  # transformers raises many kinds; the user needs the path and the reason
            raise ValueError(f"--tokenizer '{path}': could not load it as a Hugging Face tokenizer: {e}") from e
        if not getattr(self.tok, "is_fast", False):
            raise ValueError(f"--tokenizer '{path}': loaded a slow tokenizer; fastsft needs a fast one (tokenizer.json) "
                             "for character offsets")
        if chat_template is not None:
            self.tok.chat_template = chat_template
        self.template_source = ("given" if chat_template is not None else "own") if self.tok.chat_template \
            else "fastsft-fallback"
        if not self.tok.chat_template:
            self.tok.chat_template = FALLBACK_CHAT_TEMPLATE
        if self.tok.eos_token_id is None:
            raise ValueError(f"--tokenizer '{path}': it has no eos_token; set one in tokenizer_config.json")
        self.eos_id = int(self.tok.eos_token_id)
        self.pad_id = int(self.tok.pad_token_id) if self.tok.pad_token_id is not None else self.eos_id
        self.vocab_size = max(max(self.tok.get_vocab().values()) + 1, len(self.tok))
        self._special_ids = {i for i, t in self.tok.added_tokens_decoder.items() if t.special}
        structural = {t.content for t in self.tok.added_tokens_decoder.values() if t.content} | {"<think>", "</think>"}
        self._structural = re.compile("|".join(re.escape(t) for t in sorted(structural, key=len, reverse=True)))
        self._probes: dict[str, Probe] = {}
        self.shapes = ShapeCache()
        self.stop_ids = self._find_stop_ids()

    def with_chat_template(self, chat_template: str) -> HFTokenizer:
        """This tokenizer with another chat template (the vocabulary is shared, nothing is reloaded)."""
        other = copy.copy(self)
        other.tok = copy.copy(self.tok)
        other.tok.chat_template = chat_template
        other.template_source = "given"
        other._probes = {}
        other.shapes = ShapeCache()
        other.stop_ids = other._find_stop_ids()
        return other

    # plain text ---------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=False)

    def encode_text(self, text):
        # The backend directly (the same ids as self.tok(text)): transformers' __call__ may reset the backend's
        # truncation, a mutation that must not meet a batch encode running on the pipelining thread.
        ids = self.tok.backend_tokenizer.encode(text, add_special_tokens=True).ids
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        return _finish(ids, np.ones(len(ids), dtype=np.uint8))

    # conversations ------------------------------------------------------------------------------------------
    def render(self, messages, add_generation_prompt=False, tools=None, template_kwargs=None) -> str:
        try:
            return self.tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                                add_generation_prompt=add_generation_prompt, **(template_kwargs or {}))
        except Exception as e:  # jinja TemplateError, or a template's raise_exception(...)
            raise DataError(f"the tokenizer's chat template rejected this conversation: {e}", field="messages") from e

    def probe(self, template_kwargs=None) -> Probe:
        """Assistant headers and end-of-turn marker of this template under these keyword arguments (cached)."""
        key = kwargs_key(template_kwargs)
        if key not in self._probes:
            specials = [self.tok.convert_ids_to_tokens(i) for i in sorted(self._special_ids)]
            self._probes[key] = learn_probe(lambda m, gen: self.render(m, gen, None, template_kwargs), specials)
        return self._probes[key]

    def place(self, messages, wanted, template_kwargs=None) -> Placement:
        """Rendered text and the character region of each assistant message in `wanted` (see chat_template)."""
        tools = getattr(messages, "tools", None)
        render_key = kwargs_key(template_kwargs) + (json.dumps(tools, sort_keys=True, default=str) if tools else "")
        return place_assistant_turns(lambda m, gen: self.render(m, gen, tools, template_kwargs), list(messages),
                                     self.probe(template_kwargs), wanted, self._structural, self.shapes, render_key)

    def encode_placement(self, placement: Placement, encoding=None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of a placed conversation; `encoding`: its text already encoded (by a batch encode)."""
        if encoding is None:
            encoding = self.tok.backend_tokenizer.encode(placement.text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for start, end in placement.regions.values():
            first, last = _tokens_covering(encoding, start, end)
            mask[first:last] = 1
        return _finish(ids, mask)

    def encode_conversation(self, messages, train_on="all", template_kwargs=None):
        return self.encode_placement(self.place(messages, trained_turns(messages, train_on), template_kwargs))

    def start_batch(self, documents, train_on="all", template_kwargs=None, earlier_reasoning="template", counts=None,
                    raise_errors=False):
        """Place every conversation (or encode a plain text); the texts to tokenize are the placed ones. A document
        that fails gives its DataError in its place."""
        _check_earlier_reasoning(earlier_reasoning)
        placed = []  # per document: a DataError, a text's (ids, mask), or a list of Placements
        for document in documents:
            try:
                placed.append(self._encode_text_or_place(document, train_on, template_kwargs, earlier_reasoning,
                                                         counts))
            except DataError as e:
                if raise_errors:
                    raise
                placed.append(e)
        texts = [p.text for item in placed if isinstance(item, list) for p in item if isinstance(p, Placement)]
        return StagedBatch(placed, texts)

    def encode_texts(self, texts):
        """One batch encode (the tokenizers library spreads it over its threads, without the GIL)."""
        backend = self.tok.backend_tokenizer
        if len(texts) > 1:
            return backend.encode_batch(texts, add_special_tokens=False)
        return [backend.encode(t, add_special_tokens=False) for t in texts]

    def finish_batch(self, staged, encodings):
        encodings = iter(encodings)
        return [[self.encode_placement(p, next(encodings)) if isinstance(p, Placement) else p for p in item]
                if isinstance(item, list) else item for item in staged.items]

    def encode_documents(self, document, train_on="all", template_kwargs=None, earlier_reasoning="template",
                         counts=None):
        staged = self.start_batch([document], train_on, template_kwargs, earlier_reasoning, counts, raise_errors=True)
        return self.finish_batch(staged, self.encode_texts(staged.texts))[0]

    def _encode_text_or_place(self, document, train_on, template_kwargs, earlier_reasoning, counts):
        if isinstance(document, str):
            return [self.encode_text(document)]
        wanted = trained_turns(document, train_on)
        placement = self.place(document, wanted, template_kwargs)
        dropped = [i for i in placement.reasoning_dropped if i in wanted]
        moved = dropped if earlier_reasoning == "keep" else []
        if counts is not None:
            counts["reasoning_not_rendered"] = counts.get("reasoning_not_rendered", 0) + len(dropped) - len(moved)
        documents = []
        for i in moved:  # the conversation up to turn i, as at inference when the model wrote it: its reasoning shows
            prefix = Conversation(document[: i + 1], getattr(document, "tools", None))
            documents.append(self.place(prefix, {i}, template_kwargs))
            del placement.regions[i]
        if placement.regions or not documents:
            documents.insert(0, placement)
        return documents

    def prompt_ids(self, messages, template_kwargs=None) -> list[int]:
        return self.encode(self.render(template_messages(messages), True, getattr(messages, "tools", None),
                                       template_kwargs))

    def _find_stop_ids(self) -> list[int]:
        """EOS plus the special tokens that close an assistant turn (the template's end-of-turn marker)."""
        stops = [self.eos_id]
        for i in self.tok.encode(self.probe().end_of_turn, add_special_tokens=False):
            if i in self._special_ids and i not in stops:
                stops.append(int(i))
        return stops

    # identity and export -------------------------------------------------------------------------------------
    def identity(self) -> dict:
        digest = hashlib.sha256()
        for name in _HF_TOKENIZER_FILES:
            file = self.path / name
            if file.is_file():
                digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
        digest.update(self.tok.chat_template.encode())
        return {"kind": "hf", "name": str(self.tok.name_or_path), "path": str(self.path),
                "vocab_size": self.vocab_size, "chat_template": self.template_source, "hash": digest.hexdigest()}

    def save_pretrained(self, directory) -> None:
        self.tok.save_pretrained(str(directory))
