"""Where a chat template puts each assistant turn: the character regions that carry loss, for any template.

Used by `fastsft.data.tokenizer.HFTokenizer` between rendering a conversation and tokenizing it. The rule, whatever
the template: an assistant turn's region starts right after its assistant header and ends right after the template's
end-of-turn marker, so it holds the turn exactly as rendered (a think block the template writes, the content, tool
calls) and nothing of system, user or tool text, of role headers, or of the whitespace between turns.

How a region is found (one extra rendering per conversation, no per-turn re-rendering):
1. The conversation is rendered as it is (`text`, what the model is trained on) and once more as a *skeleton*: every
   assistant content and reasoning replaced by unique sentinels (`\\ue000N\\ue001`, private-use characters). Only
   the non-whitespace core of each piece is replaced, and the text of the tokenizer's added tokens (`<think>`,
   `</think>`, ...) inside a content is kept, so templates that trim, split on `</think>` or test for emptiness
   behave on the skeleton as on the real text.
2. The skeleton's literal text between sentinels is matched in order against the real text: that maps every
   skeleton position to a real one and shows how the template rendered each piece (verbatim, trimmed, rewritten;
   a piece whose sentinel is missing was dropped by the template, e.g. earlier turns' reasoning in Qwen3).
3. In the skeleton, turn k's region starts after the last assistant header before its first sentinel (or the first
   header after the previous turn, for a turn with nothing to replace) and ends after the first end-of-turn marker
   after its last sentinel. Header and marker are learned once per template and keyword arguments by rendering
   probe conversations: the generation prompt, the header of an earlier turn, and what follows a final answer.
4. Checks, per turn that trains: the region holds every sentinel of its turn and none of another turn, regions are
   in order and disjoint, and the region ends with the end-of-turn marker. A turn that fails any of them is an error
   naming its number among the assistant turns (1-based); nothing is guessed.

Tokens: a token is trained when any of its characters lies inside a region (so a token that straddles a boundary,
e.g. a BPE merge of the header's last newline with the content's first, is trained: no character of the answer is
ever left out). Special tokens never straddle, so the end-of-turn token is always trained and the header's special
tokens never are.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field

from fastsft.data.formats import DataError

# Keys a message may carry into the template (anything else, such as fastsft's own "train" flag, is left out).
TEMPLATE_MESSAGE_KEYS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")
_SENTINEL_PAIRS = [(chr(0xE000 + 2 * i), chr(0xE001 + 2 * i)) for i in range(8)]
_PROBE_USER = "Hi"


class PlacementError(DataError):
    """An assistant turn whose rendered region could not be found with certainty."""


@dataclass
class Probe:
    """What a template writes around assistant turns, learned once per template and keyword arguments."""

    headers: list[str]  # assistant headers, longest first: the generation prompt, an earlier turn's header
    end_of_turn: str  # what closes an assistant turn (e.g. <|im_end|>), "" when the template writes nothing


@dataclass
class Placement:
    """The regions of one rendered conversation."""

    text: str
    regions: dict[int, tuple[int, int]]  # message index -> [start, end) character span in text
    reasoning_dropped: list[int] = field(default_factory=list)  # assistant messages whose reasoning was not rendered


def template_messages(messages: list[dict]) -> list[dict]:
    """The messages as the chat template gets them (fastsft's own keys removed)."""
    return [{k: m[k] for k in TEMPLATE_MESSAGE_KEYS if k in m} for m in messages]


def learn_probe(render, special_tokens=()) -> Probe:
    """Render probe conversations with `render(messages, add_generation_prompt)` to learn headers and end-of-turn.

    The end-of-turn marker is what follows a final answer, through its first special token (e.g. `<|im_end|>`,
    `<|eot_id|>`, `</s>`), or up to its first whitespace when it holds none (e.g. `<end_of_turn>` written as text).
    """
    sentinel = "\ue000999\ue001"  # digits: survive a template that upper-cases content
    user = {"role": "user", "content": _PROBE_USER}
    headers = []
    try:
        prompt = render([user], False)
        with_generation = render([user], True)
        if with_generation.startswith(prompt):
            headers.append(with_generation[len(prompt):])
    except DataError:
        prompt = None
    end_of_turn = ""
    try:
        final = render([user, {"role": "assistant", "content": sentinel}], False)
        if sentinel in final:
            end_of_turn = _first_marker(final[final.index(sentinel) + len(sentinel):].rstrip(), special_tokens)
    except DataError:
        pass
    try:
        earlier = render([user, {"role": "assistant", "content": sentinel}, {"role": "user", "content": _PROBE_USER}],
                         False)
        if prompt is not None and earlier.startswith(prompt) and sentinel in earlier:
            headers.append(earlier[len(prompt): earlier.index(sentinel)])
    except DataError:
        pass
    headers = sorted(set(headers), key=len, reverse=True)
    return Probe(headers=headers, end_of_turn=end_of_turn)


def _first_marker(tail: str, special_tokens) -> str:
    ends = [tail.find(t) + len(t) for t in special_tokens if t and t in tail]
    if ends:
        return tail[: min(ends)]
    cut = re.search(r"\S\s", tail)
    return tail[: cut.start() + 1] if cut else tail


def _pieces(text: str, structural: re.Pattern | None) -> list[tuple[str, bool]]:
    """Split text into (piece, is_structural): the added tokens' texts stay as they are, the rest is replaceable."""
    if structural is None or not text:
        return [(text, False)]
    out, pos = [], 0
    for m in structural.finditer(text):
        if m.start() > pos:
            out.append((text[pos: m.start()], False))
        out.append((m.group(0), True))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], False))
    return out


def _skeleton_text(text: str, structural, make_sentinel) -> str:
    parts = []
    for piece, is_structural in _pieces(text, structural):
        core = piece.strip()
        if is_structural or not core:
            parts.append(piece)
            continue
        lead = piece[: len(piece) - len(piece.lstrip())]
        trail = piece[len(piece.rstrip()):]
        parts.append(lead + make_sentinel(core, "".join(parts) + lead) + trail)
    return "".join(parts)


def place_assistant_turns(render, messages: list[dict], probe: Probe, wanted: set[int],
                          structural: re.Pattern | None = None) -> Placement:
    """Render `messages` and find the region of each assistant message whose index is in `wanted`.

    `render(messages, add_generation_prompt)` renders template-ready messages (see `template_messages`).
    Raises PlacementError naming the assistant turn (1-based among assistant turns) that cannot be placed.
    """
    messages = template_messages(messages)
    text = render(messages, False)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turn_number = {i: n + 1 for n, i in enumerate(assistant)}
    all_text = "".join(str(m.get("content") or "") + str(m.get("reasoning_content") or "") for m in messages)
    open_mark, close_mark = next(((a, b) for a, b in _SENTINEL_PAIRS if a not in all_text and b not in all_text),
                                 (None, None))
    if open_mark is None:
        raise PlacementError("the conversation uses every private-use character fastsft marks turns with "
                             "(U+E000..U+E00F); remove them", field="messages")

    cores: list[str] = []  # sentinel number -> the real text it stands for
    owner: list[int] = []  # sentinel number -> message index
    leads: list[str] = []  # sentinel number -> the text before it in its field (whitespace, <think>, ...)
    reasoning_ids: dict[int, list[int]] = {}

    skeleton_messages = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            skeleton_messages.append(m)
            continue

        def make(core, lead, i=i):
            cores.append(core)
            owner.append(i)
            leads.append(lead)
            return f"{open_mark}{len(cores) - 1}{close_mark}"

        m = dict(m)
        content = m.get("content") or ""
        cut = content.find("</think>")  # a think block written in the content is reasoning too
        before = len(cores)
        head = _skeleton_text(content[:max(cut, 0)], structural, make)
        reasoning = list(range(before, len(cores)))
        m["content"] = head + _skeleton_text(content[max(cut, 0):], structural, lambda c, lead: make(c, head + lead))
        if isinstance(m.get("reasoning_content"), str):
            before = len(cores)
            m["reasoning_content"] = _skeleton_text(m["reasoning_content"], structural, make)
            reasoning += range(before, len(cores))
        reasoning_ids[i] = reasoning
        skeleton_messages.append(m)
    skeleton = render(skeleton_messages, False)

    # Align the skeleton with the real text: literal pieces must match in order.
    token = re.compile(re.escape(open_mark) + r"(\d+)" + re.escape(close_mark))
    s_starts, s_ends, t_starts, t_ends = [], [], [], []  # sentinel occurrences, skeleton and real spans
    literal_shift = [(0, 0)]  # (skeleton offset where a literal piece starts, real offset) for exact mapping
    s_pos, t_pos = 0, 0
    matches = list(token.finditer(skeleton))
    bounds = [m.start() for m in matches] + [len(skeleton)]
    first_literal = skeleton[: bounds[0]]
    if not text.startswith(first_literal):
        raise _unplaceable(wanted, turn_number, "the rendered text does not match the template's structure")
    t_pos = len(first_literal)
    for j, m in enumerate(matches):
        n = int(m.group(1))
        if n >= len(cores):
            raise _unplaceable(wanted, turn_number, "a template rewrote fastsft's turn markers")
        literal = skeleton[m.end(): bounds[j + 1]]
        last = j + 1 == len(matches)
        core = cores[n]
        if text.startswith(core, t_pos) and (text.endswith(literal) and t_pos + len(core) + len(literal) == len(text)
                                              if last else text.startswith(literal, t_pos + len(core))):
            t_end = t_pos + len(core)
        elif last:
            t_end = len(text) - len(literal)
            if not text.endswith(literal) or t_end < t_pos:
                raise _unplaceable({owner[n]} & wanted or wanted, turn_number, "could not match the text rendered "
                                   "after this turn's content")
        elif literal:
            t_end = text.find(literal, t_pos)
            if t_end < 0:
                raise _unplaceable({owner[n]} & wanted or wanted, turn_number, "could not match the text rendered "
                                   "after this turn's content")
        else:
            raise _unplaceable({owner[n]} & wanted or wanted, turn_number, "two pieces of content are rendered "
                               "with nothing between them, so their boundary is ambiguous")
        s_starts.append(m.start())
        s_ends.append(m.end())
        t_starts.append(t_pos)
        t_ends.append(t_end)
        literal_shift.append((m.end(), t_end))
        s_pos, t_pos = m.end() + len(literal), t_end + len(literal)
    if not matches and skeleton != text:
        raise _unplaceable(wanted, turn_number, "the rendered text does not match the template's structure")

    shift_at = [p for p, _ in literal_shift]

    def to_real(x: int) -> int:
        j = bisect.bisect_right(s_starts, x) - 1
        if j >= 0 and x < s_ends[j]:  # inside a sentinel: only its edges are meaningful
            return t_starts[j] if x == s_starts[j] else t_ends[j]
        s0, t0 = literal_shift[bisect.bisect_right(shift_at, x) - 1]
        return t0 + (x - s0)

    occurrences: dict[int, list[tuple[int, int]]] = {}
    first_lead: dict[int, str] = {}
    for j, m in enumerate(matches):
        n = int(m.group(1))
        occurrences.setdefault(owner[n], []).append((s_starts[j], s_ends[j]))
        first_lead.setdefault(owner[n], leads[n])

    regions, cursor = {}, 0
    end_of_turn = probe.end_of_turn
    for n_turn, i in enumerate(assistant):
        spans = occurrences.get(i, [])
        later = [s for k in assistant[n_turn + 1:] for s, _ in occurrences.get(k, [])]
        limit = min(later) if later else len(skeleton)
        try:
            start, end = _find_region(skeleton, spans, cursor, limit, probe.headers, end_of_turn,
                                      first_lead.get(i, messages[i].get("content") or ""))
        except PlacementError as e:
            if i in wanted:
                raise PlacementError(f"assistant turn {turn_number[i]} (message {i + 1}): {e.problem}",
                                     field="messages") from None
            continue
        # Checks: every sentinel of this turn inside, none of another turn's.
        inside = [owner[int(m.group(1))] for m in matches if start <= m.start() < end]
        if any(k != i for k in inside) or any(not (start <= s and e <= end) for s, e in spans):
            if i in wanted:
                raise PlacementError(f"assistant turn {turn_number[i]} (message {i + 1}): its region overlaps "
                                     "another message's; the template does not render turns one after another",
                                     field="messages")
            continue
        cursor = end
        if i in wanted:
            regions[i] = (to_real(start), to_real(end))
    dropped = [i for i, ids in reasoning_ids.items()
               if ids and not any(f"{open_mark}{n}{close_mark}" in skeleton for n in ids)]
    return Placement(text=text, regions=regions, reasoning_dropped=dropped)


def _find_region(skeleton, spans, cursor, limit, headers, end_of_turn, lead) -> tuple[int, int]:
    """[start, end) of one assistant turn in the skeleton (see the module docstring, step 3)."""
    first = min((s for s, _ in spans), default=None)
    last = max((e for _, e in spans), default=None)
    start = None
    if first is not None:
        for header in headers:  # the last header before the turn's first sentinel
            if header:
                p = skeleton.rfind(header, cursor, first)
                if p >= 0:
                    start = p + len(header)
                    break
        if start is None:
            if any(headers):
                raise PlacementError("no assistant header found before its content")
            # A template with no assistant header (e.g. Mistral's [INST] style): the content starts the turn, with
            # the whitespace it began with when the template kept it.
            start = first - len(lead) if lead and skeleton.endswith(lead, cursor, first) else first
    elif any(headers):
        found = [(p, -len(h)) for h in headers if h for p in [skeleton.find(h, cursor, limit)] if p >= 0]
        if not found:
            raise PlacementError("no assistant header found for this turn (and it has no content to anchor it)")
        p, neg = min(found)
        start = p - neg
    elif end_of_turn and (q := skeleton.find(end_of_turn, cursor, limit)) >= 0:
        # No header and only whitespace as content: the turn is that whitespace (when kept) and the marker.
        start = q - len(lead) if lead and skeleton.endswith(lead, cursor, q) else q
    else:
        raise PlacementError("the template writes no assistant header and this turn has no content to anchor it")
    if end_of_turn:
        q = skeleton.find(end_of_turn, max(start, last or start))
        if q < 0:
            raise PlacementError(f"no end-of-turn marker {end_of_turn!r} after it")
        end = q + len(end_of_turn)
    elif last is not None:
        end = last
    else:
        raise PlacementError("the template writes no end-of-turn marker and the turn has no content")
    return start, end


def _unplaceable(wanted, turn_number, problem) -> PlacementError:
    first = min(wanted) if wanted else None
    which = f"assistant turn {turn_number[first]} (message {first + 1}): " if first is not None else ""
    return PlacementError(f"{which}{problem}; the chat template changes content in a way fastsft cannot follow",
                          field="messages")


def kwargs_key(kwargs: dict | None) -> str:
    return json.dumps(kwargs or {}, sort_keys=True, default=str)
