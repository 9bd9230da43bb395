"""Where a chat template puts each assistant turn: the character regions that carry loss, for any template.

Used by `fastsft.data.tokenizer.HFTokenizer` between rendering a conversation and tokenizing it. The rule, whatever
the template: an assistant turn's region starts right after its assistant header and ends right after the template's
end-of-turn marker, so it holds the turn exactly as rendered (a think block the template writes, the content, tool
calls) and nothing of system, user or tool text, of role headers, or of the whitespace between turns.

How a region is found (at most one extra rendering per conversation, usually none: see "Shapes" below):
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

Shapes: the skeleton rendering is shared between conversations of one shape. A *shape skeleton* replaces the text of
every message (not only the assistant's) the same way, so it depends only on roles, the whitespace around each text,
the added tokens inside them, tool calls, tools and keyword arguments; its rendering and the regions found in it are
cached (`ShapeCache`). A conversation whose real rendering equals its shape skeleton with every sentinel replaced by
its text (the template rendered every piece verbatim, in place: checked by one string comparison) takes its regions
from the cache, mapped through that exact correspondence. Any other conversation (a template that rewrites what a
user or an assistant wrote) is placed alone as in steps 1-4, and the cache stops being tried after many such
conversations. Both ways give the same placement (tests/test_chat_template.py checks it for every template there).

Tokens: a token is trained when any of its characters lies inside a region (so a token that straddles a boundary,
e.g. a BPE merge of the header's last newline with the content's first, is trained: no character of the answer is
ever left out). Special tokens never straddle, so the end-of-turn token is always trained and the header's special
tokens never are.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections import OrderedDict
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
                          structural: re.Pattern | None = None, shapes: ShapeCache | None = None,
                          render_key: str = "") -> Placement:
    """Render `messages` and find the region of each assistant message whose index is in `wanted`.

    `render(messages, add_generation_prompt)` renders template-ready messages (see `template_messages`).
    `shapes`: layouts of skeletons rendered before (see `ShapeCache`); `render_key` names what else the rendering
    depends on (keyword arguments, tools), so only renderings of the same kind share a layout.
    Raises PlacementError naming the assistant turn (1-based among assistant turns) that cannot be placed.
    """
    messages = template_messages(messages)
    text = render(messages, False)
    marks = _choose_marks(messages)
    if shapes is not None and shapes.enabled:
        placement = _place_by_shape(render, messages, text, probe, wanted, structural, marks, shapes, render_key)
        if placement is not None:
            return placement
    # The conversation alone: a skeleton of its own (only assistant text replaced), aligned tolerantly.
    sk = _build_skeleton(messages, structural, marks, every_role=False)
    layout = _layout(render(sk.messages, False), sk, messages, probe, marks)
    turn_number = _turn_numbers(messages)
    alignment = _align_tolerant(layout, sk, text, wanted, turn_number)
    return _placement(layout, alignment, text, wanted, turn_number)


class ShapeCache:
    """Skeleton layouts by skeleton, so that conversations of one shape share one skeleton rendering.

    A shape skeleton replaces the text of every message (not only the assistant's), so it depends only on the
    conversation's shape: its roles, the whitespace around each content, the added tokens inside them, tool calls
    and names. A conversation whose real rendering equals its shape skeleton with each sentinel replaced by the
    text it stands for (the template rendered every piece verbatim, in place) is placed from the cached layout with
    no second rendering. Any other conversation is placed alone, as before; after many such conversations and few
    of the other kind (a template that rewrites content) the cache stops being tried.
    """

    def __init__(self, size: int = 1024):
        self.size = size
        self.layouts: OrderedDict[bytes, _Layout] = OrderedDict()
        self.placed = 0  # conversations placed from a shape layout
        self.rendered = 0  # shape skeletons rendered (cache misses)
        self.mismatched = 0  # conversations whose rendering did not match their shape skeleton

    @property
    def enabled(self) -> bool:
        return not (self.mismatched >= 64 and self.mismatched > 4 * self.placed)

    def layout(self, key: bytes, make) -> _Layout:
        layout = self.layouts.get(key)
        if layout is None:
            layout = self.layouts[key] = make()
            self.rendered += 1
            if len(self.layouts) > self.size:
                self.layouts.popitem(last=False)
        else:
            self.layouts.move_to_end(key)
        return layout


def _place_by_shape(render, messages, text, probe, wanted, structural, marks, shapes: ShapeCache,
                    render_key: str) -> Placement | None:
    """The placement from the conversation's shape layout, or None when its rendering does not match the shape
    skeleton exactly or a wanted turn cannot be placed in it (the caller then places the conversation alone, which
    also words the error)."""
    sk = _build_skeleton(messages, structural, marks, every_role=True)
    shape = render_key + "\0" + json.dumps(sk.messages, ensure_ascii=False, sort_keys=True, default=str)
    key = hashlib.blake2b(shape.encode("utf-8", "surrogatepass"), digest_size=16).digest()  # tools can be long
    layout = shapes.layout(key, lambda: _layout(render(sk.messages, False), sk, messages, probe, marks))
    if layout.bad_marker or any(isinstance(layout.regions.get(i), str) for i in wanted):
        return None
    alignment = _align_exact(layout, sk, text)
    if alignment is None:
        shapes.mismatched += 1
        return None
    shapes.placed += 1
    return _placement(layout, alignment, text, wanted, _turn_numbers(messages))


@dataclass
class _Skeleton:
    """A conversation with texts replaced by numbered sentinels."""

    messages: list[dict]
    cores: list[str]  # sentinel number -> the real text it stands for
    owner: list[int]  # sentinel number -> message index
    leads: list[str]  # sentinel number -> the text before it in its field (whitespace, <think>, ...)
    reasoning_ids: dict[int, list[int]]  # assistant message index -> its reasoning's sentinel numbers


@dataclass
class _Layout:
    """What a rendered skeleton says, whatever the real texts are: where sentinels landed, each assistant turn's
    region in the skeleton (or why it has none), and which turns' reasoning the template dropped."""

    skeleton: str
    matches: list[tuple[int, int, int]]  # (sentinel number, start, end) in skeleton order
    bad_marker: bool  # a sentinel number no piece has: the template rewrote the markers
    regions: dict[int, tuple[int, int] | str]  # assistant message index -> [start, end) in the skeleton, or a problem
    dropped: list[int]


@dataclass
class _Alignment:
    """Skeleton positions -> real text positions: sentinel spans in both, and where each literal piece starts."""

    s_starts: list[int]
    s_ends: list[int]
    t_starts: list[int]
    t_ends: list[int]
    literal_shift: list[tuple[int, int]]  # (skeleton offset where a literal piece starts, real offset)

    def to_real(self, x: int) -> int:
        j = bisect.bisect_right(self.s_starts, x) - 1
        if j >= 0 and x < self.s_ends[j]:  # inside a sentinel: only its edges are meaningful
            return self.t_starts[j] if x == self.s_starts[j] else self.t_ends[j]
        s0, t0 = self.literal_shift[bisect.bisect_right([p for p, _ in self.literal_shift], x) - 1]
        return t0 + (x - s0)


def _choose_marks(messages) -> tuple[str, str]:
    all_text = "".join(str(m.get("content") or "") + str(m.get("reasoning_content") or "") for m in messages)
    marks = next(((a, b) for a, b in _SENTINEL_PAIRS if a not in all_text and b not in all_text), None)
    if marks is None:
        raise PlacementError("the conversation uses every private-use character fastsft marks turns with "
                             "(U+E000..U+E00F); remove them", field="messages")
    return marks


def _turn_numbers(messages) -> dict[int, int]:
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return {i: n + 1 for n, i in enumerate(assistant)}


def _build_skeleton(messages, structural, marks, every_role: bool) -> _Skeleton:
    """Assistant contents and reasoning (and, with every_role, every other message's content) as sentinels."""
    open_mark, close_mark = marks
    sk = _Skeleton([], [], [], [], {})
    for i, m in enumerate(messages):

        def make(core, lead, i=i):
            sk.cores.append(core)
            sk.owner.append(i)
            sk.leads.append(lead)
            return f"{open_mark}{len(sk.cores) - 1}{close_mark}"

        if m["role"] != "assistant":
            if every_role and isinstance(m.get("content"), str):
                m = dict(m)
                m["content"] = _skeleton_text(m["content"], structural, make)
            sk.messages.append(m)
            continue
        m = dict(m)
        content = m.get("content") or ""
        cut = content.find("</think>")  # a think block written in the content is reasoning too
        before = len(sk.cores)
        head = _skeleton_text(content[:max(cut, 0)], structural, make)
        reasoning = list(range(before, len(sk.cores)))
        m["content"] = head + _skeleton_text(content[max(cut, 0):], structural, lambda c, lead: make(c, head + lead))
        if isinstance(m.get("reasoning_content"), str):
            before = len(sk.cores)
            m["reasoning_content"] = _skeleton_text(m["reasoning_content"], structural, make)
            reasoning += range(before, len(sk.cores))
        sk.reasoning_ids[i] = reasoning
        sk.messages.append(m)
    return sk


def _layout(skeleton: str, sk: _Skeleton, messages, probe: Probe, marks) -> _Layout:
    """Find each assistant turn's region in a rendered skeleton (module docstring, steps 3 and 4), never raising: a
    turn that cannot be placed gets its problem instead of a region."""
    open_mark, close_mark = marks
    token = re.compile(re.escape(open_mark) + r"(\d+)" + re.escape(close_mark))
    matches = [(int(m.group(1)), m.start(), m.end()) for m in token.finditer(skeleton)]
    bad_marker = any(n >= len(sk.cores) for n, _, _ in matches)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    occurrences: dict[int, list[tuple[int, int]]] = {}
    first_lead: dict[int, str] = {}
    if not bad_marker:
        for n, s, e in matches:
            occurrences.setdefault(sk.owner[n], []).append((s, e))
            first_lead.setdefault(sk.owner[n], sk.leads[n])
    regions, cursor = {}, 0
    for n_turn, i in enumerate(assistant):
        spans = occurrences.get(i, [])
        later = [s for k in assistant[n_turn + 1:] for s, _ in occurrences.get(k, [])]
        limit = min(later) if later else len(skeleton)
        try:
            start, end = _find_region(skeleton, spans, cursor, limit, probe.headers, probe.end_of_turn,
                                      first_lead.get(i, messages[i].get("content") or ""))
        except PlacementError as e:
            regions[i] = e.problem
            continue
        # Checks: every sentinel of this turn inside, none of another message's.
        inside = [sk.owner[n] for n, s, _ in matches if start <= s < end] if not bad_marker else []
        if any(k != i for k in inside) or any(not (start <= s and e <= end) for s, e in spans):
            regions[i] = "its region overlaps another message's; the template does not render turns one after another"
            continue
        cursor = end
        regions[i] = (start, end)
    present = {n for n, _, _ in matches}
    dropped = [i for i, ids in sk.reasoning_ids.items() if ids and not any(n in present for n in ids)]
    return _Layout(skeleton, matches, bad_marker, regions, dropped)


def _align_exact(layout: _Layout, sk: _Skeleton, text: str) -> _Alignment | None:
    """The alignment when `text` is the skeleton with every sentinel replaced by its text, else None."""
    a = _Alignment([], [], [], [], [(0, 0)])
    pieces, s_pos, t_pos = [], 0, 0
    skeleton = layout.skeleton
    for n, s, e in layout.matches:
        pieces.append(skeleton[s_pos:s])
        t_pos += s - s_pos
        core = sk.cores[n]
        pieces.append(core)
        a.s_starts.append(s)
        a.s_ends.append(e)
        a.t_starts.append(t_pos)
        t_pos += len(core)
        a.t_ends.append(t_pos)
        a.literal_shift.append((e, t_pos))
        s_pos = e
    pieces.append(skeleton[s_pos:])
    return a if "".join(pieces) == text else None


def _align_tolerant(layout: _Layout, sk: _Skeleton, text: str, wanted, turn_number) -> _Alignment:
    """Match the skeleton's literal text between sentinels in order against the real text (module docstring, step
    2), following a template that trims, rewrites or drops pieces; raises when the literal text cannot be matched."""
    skeleton, matches = layout.skeleton, layout.matches
    a = _Alignment([], [], [], [], [(0, 0)])
    bounds = [s for _, s, _ in matches] + [len(skeleton)]
    first_literal = skeleton[: bounds[0]]
    if not text.startswith(first_literal):
        raise _unplaceable(wanted, turn_number, "the rendered text does not match the template's structure")
    if layout.bad_marker:
        raise _unplaceable(wanted, turn_number, "a template rewrote fastsft's turn markers")
    t_pos = len(first_literal)
    for j, (n, s, e) in enumerate(matches):
        literal = skeleton[e: bounds[j + 1]]
        last = j + 1 == len(matches)
        core = sk.cores[n]
        owner = {sk.owner[n]} & wanted or wanted
        if text.startswith(core, t_pos) and (text.endswith(literal) and t_pos + len(core) + len(literal) == len(text)
                                              if last else text.startswith(literal, t_pos + len(core))):
            t_end = t_pos + len(core)
        elif last:
            t_end = len(text) - len(literal)
            if not text.endswith(literal) or t_end < t_pos:
                raise _unplaceable(owner, turn_number, "could not match the text rendered after this turn's content")
        elif literal:
            t_end = text.find(literal, t_pos)
            if t_end < 0:
                raise _unplaceable(owner, turn_number, "could not match the text rendered after this turn's content")
        else:
            raise _unplaceable(owner, turn_number, "two pieces of content are rendered with nothing between them, so "
                               "their boundary is ambiguous")
        a.s_starts.append(s)
        a.s_ends.append(e)
        a.t_starts.append(t_pos)
        a.t_ends.append(t_end)
        a.literal_shift.append((e, t_end))
        t_pos = t_end + len(literal)
    if not matches and skeleton != text:
        raise _unplaceable(wanted, turn_number, "the rendered text does not match the template's structure")
    return a


def _placement(layout: _Layout, alignment: _Alignment, text: str, wanted, turn_number) -> Placement:
    """The real regions of the wanted turns; raises for the first wanted turn (in order) the layout could not place."""
    regions = {}
    for i, region in layout.regions.items():
        if i not in wanted:
            continue
        if isinstance(region, str):
            raise PlacementError(f"assistant turn {turn_number[i]} (message {i + 1}): {region}", field="messages")
        regions[i] = (alignment.to_real(region[0]), alignment.to_real(region[1]))
    return Placement(text=text, regions=regions, reasoning_dropped=list(layout.dropped))


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
