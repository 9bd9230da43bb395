"""Loss masks for real chat templates and for templates in other families' styles, against an independent reference.

The reference is transformers' own `return_assistant_tokens_mask`, computed from a version of each template with
`{% generation %}` markers around exactly what an assistant turn should train (after its header, through its
end-of-turn token): for Llama 3 the marked template TRL ships (`trl/chat_templates/llama3_training.jinja`), for
Qwen3 a marked copy written here (checked to render byte-identically to the original), and for the Gemma, Mistral,
DeepSeek-R1 and content-rewriting styles the templates written below. fastsft never looks at the markers (they
render nothing), so the masks come from two independent mechanisms. Token ids are compared with
`apply_chat_template(tokenize=True)`.

The real tokenizers are `/work/shared/tokenizers/{qwen3,llama3_1}` (or $FASTSFT_TOKENIZERS; fetch them with
scripts/fetch_test_tokenizers.sh); tests that need one skip with the reason when it is absent.
"""

import importlib.resources
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from fastsft.data.formats import Conversation, DataError, normalize_record
from fastsft.data.tokenizer import load_tokenizer

TOKENIZERS = Path(os.environ.get("FASTSFT_TOKENIZERS", Path(__file__).resolve().parents[2] / "shared" / "tokenizers"))
if not TOKENIZERS.is_dir():
    TOKENIZERS = Path("/work/shared/tokenizers")


def tokenizer_dir(name):
    path = TOKENIZERS / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"real tokenizer {name} not found in {TOKENIZERS} (run scripts/fetch_test_tokenizers.sh, or set "
                    "FASTSFT_TOKENIZERS)")
    return path


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer(tokenizer_dir("qwen3"))


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(tokenizer_dir("llama3_1"))


# ---------------------------------------------------------------------------------------------- references


def reference(tok, messages, template, **kwargs):
    """(ids, mask) from transformers' return_assistant_tokens_mask with a {% generation %}-marked template."""
    from fastsft.data.chat_template import template_messages

    out = tok.tok.apply_chat_template(template_messages(messages), tools=getattr(messages, "tools", None),
                                      chat_template=template, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, **kwargs)
    mask = np.asarray(out["assistant_masks"], dtype=np.uint8)
    mask[:1] = 0  # fastsft never trains position 0 (nothing predicts it)
    return list(out["input_ids"]), mask


def runs(mask):
    """[start, end) of each run of ones."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def check(tok, messages, template=None, **kwargs):
    """fastsft's ids and masks (train_on all and last) against apply_chat_template and the marked reference."""
    template = template or tok.tok.chat_template
    ids, mask = tok.encode_conversation(messages, "all", kwargs or None)
    plain = tok.tok.apply_chat_template(
        [{k: v for k, v in m.items() if k != "train"} for m in messages], tools=getattr(messages, "tools", None),
        tokenize=True, return_dict=False, **kwargs)
    assert ids.tolist() == list(plain), "token ids differ from apply_chat_template"
    ref_ids, ref_mask = reference(tok, messages, MARKED.get(id(tok), {}).get(template, template), **kwargs)
    assert ref_ids == ids.tolist()
    assert mask.tolist() == ref_mask.tolist(), explain(tok, ids, mask, ref_mask)
    _, last = tok.encode_conversation(messages, "last", kwargs or None)
    expected_last = np.zeros_like(ref_mask)
    start, end = runs(ref_mask)[-1]
    expected_last[start:end] = 1
    assert last.tolist() == expected_last.tolist(), explain(tok, ids, last, expected_last)
    return ids, mask


MARKED: dict = {}  # id(tokenizer) -> {original template: marked template}


def explain(tok, ids, got, want):
    def show(mask):
        return "".join(f"[{tok.decode([i])}]" if m else tok.decode([i]) for i, m in zip(ids, mask, strict=True))
    return f"\nfastsft:   {show(got)!r}\nreference: {show(want)!r}"


def trained_text(tok, ids, mask):
    return [tok.decode(ids[a:b]) for a, b in runs(mask)]


# ---------------------------------------------------------------------------------------------- conversations

PIECES = ["Hello!", "数据很好", "emoji 🎉🚀 ok", "x+y=z", "line\nbreak", "  padded  ", "a", "42", "Résumé", "\n"]


def text(rng):
    return " ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 4)))


def edge(rng, s):
    return rng.choice(["", " ", "\n", "\n\n"]) + s + rng.choice(["", " ", "\n", "\n\n"])


def conversations(seed, n, reasoning=True):
    """Multi-turn conversations with the cases the issue lists: edge whitespace, "a" and " " answers, CJK, emoji,
    think blocks early and late, reasoning_content, two assistant messages in a row, system prompts."""
    rng = random.Random(seed)
    out = []
    for c in range(n):
        messages = [{"role": "system", "content": text(rng)}] if c % 3 == 0 else []
        for t in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": edge(rng, text(rng))})
            answer = {"role": "assistant", "content": rng.choice([edge(rng, text(rng)), "a", " ", "Hello!\n"])}
            if reasoning and rng.random() < 0.3:
                answer["content"] = f"<think>\n{text(rng)}\n</think>\n\n{answer['content']}"
            elif reasoning and rng.random() < 0.3:
                answer["reasoning_content"] = edge(rng, text(rng))
            messages.append(answer)
            if rng.random() < 0.15:
                messages.append({"role": "assistant", "content": edge(rng, text(rng))})
        out.append(messages)
    return out


def qwen3_marked(template: str) -> str:
    """The Qwen3 template with {% generation %} around each assistant turn's output (header excluded, <|im_end|>
    included), written by rewriting the assistant branch; it must render exactly as the original."""
    start = template.index("        {%- if loop.index0 > ns.last_query_index %}")
    end = template.index("        {%- if message.tool_calls %}")
    branch = template[start:end]
    assert "'\\n<think>\\n' + reasoning_content.strip('\\n')" in branch
    marked_branch = (
        "        {%- set body = content %}\n"
        "        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}\n"
        "            {%- set body = '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + "
        "content.lstrip('\\n') %}\n"
        "        {%- endif %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' }}{%- generation %}{{- body }}\n")
    out = template[:start] + marked_branch + template[end:]
    close = "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}"
    assert close in out
    return out.replace(close, "        {{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}\n    {%- elif message.role == "
                                 "\"tool\" %}")


def test_qwen3_masks_match_the_reference(qwen3):
    marked = qwen3_marked(qwen3.tok.chat_template)
    MARKED[id(qwen3)] = {qwen3.tok.chat_template: marked}
    for messages in conversations("qwen3", 40):
        assert qwen3.render(messages) == qwen3.tok.apply_chat_template(messages, tokenize=False, chat_template=marked)
        check(qwen3, messages)


def test_qwen3_issue_cases(qwen3):
    """The failures the issue measured, each now trained as the template renders it."""
    MARKED[id(qwen3)] = {qwen3.tok.chat_template: qwen3_marked(qwen3.tok.chat_template)}
    cases = {
        "edge whitespace, earlier turn": ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!\n"},
                                           {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}],
                                          ["Hello!\n<|im_end|>", "<think>\n\n</think>\n\nok<|im_end|>"]),
        "short answers": ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"},
                           {"role": "user", "content": "y"}, {"role": "assistant", "content": " "},
                           {"role": "user", "content": "z"}, {"role": "assistant", "content": "b"}],
                          ["a<|im_end|>", " <|im_end|>", "<think>\n\n</think>\n\nb<|im_end|>"]),
        "reasoning in an earlier turn": ([{"role": "user", "content": "2+3?"},
                                          {"role": "assistant", "content": "<think>\nadd\n</think>\n\n5"},
                                          {"role": "user", "content": "and 4+4?"}, {"role": "assistant", "content": "8"}],
                                         ["5<|im_end|>", "<think>\n\n</think>\n\n8<|im_end|>"]),
        "reasoning_content": ([{"role": "user", "content": "2+3?"},
                               {"role": "assistant", "content": "5", "reasoning_content": "2+3=5"}],
                              ["<think>\n2+3=5\n</think>\n\n5<|im_end|>"]),
        "two assistant messages in a row": ([{"role": "user", "content": "go"}, {"role": "assistant", "content": "one"},
                                             {"role": "assistant", "content": "two"}],
                                            ["one<|im_end|>", "<think>\n\n</think>\n\ntwo<|im_end|>"]),
    }
    for name, (messages, expected) in cases.items():
        ids, mask = check(qwen3, messages)
        assert trained_text(qwen3, ids, mask) == expected, name


def test_qwen3_tools(qwen3):
    MARKED[id(qwen3)] = {qwen3.tok.chat_template: qwen3_marked(qwen3.tok.chat_template)}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = Conversation([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "1"},
        {"role": "assistant", "content": "Let me check again.", "tool_calls": [call, call]},
        {"role": "tool", "content": "21C"}, {"role": "tool", "content": "22C"},
        {"role": "assistant", "content": "It is 21°C.", "reasoning_content": "The tool said 21."},
    ], tools=tools)
    ids, mask = check(qwen3, messages)
    trained = trained_text(qwen3, ids, mask)
    assert len(trained) == 3 and all("get_weather" in t for t in trained[:2])
    assert not any("temp" in t or "21C" in t for t in trained), "tool results never train"
    assert "# Tools" in qwen3.decode(ids)


def test_qwen3_enable_thinking_false(qwen3):
    MARKED[id(qwen3)] = {qwen3.tok.chat_template: qwen3_marked(qwen3.tok.chat_template)}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "final"}]
    ids, mask = qwen3.encode_conversation(messages, template_kwargs={"enable_thinking": False})
    assert ids.tolist() == qwen3.tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                         enable_thinking=False)
    # the empty think block of the final turn is what the generation prompt writes: prompt at inference, not trained
    assert trained_text(qwen3, ids, mask) == ["earlier<|im_end|>", "final<|im_end|>"]
    prompt = qwen3.prompt_ids(messages[:3], {"enable_thinking": False})
    assert qwen3.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_train_prepares_with_the_chat_template_options(qwen3, tmp_path):
    """`fastsft train`'s data.chat_template_kwargs and data.columns reach preparation (Qwen3 with enable_thinking
    false renders the final turn without an empty think block)."""
    from fastsft.data.shards import open_shards
    from fastsft.train import config as C
    from fastsft.train.build import prepare_data
    from fastsft.train.distributed import DistInfo

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "final"}]
    (tmp_path / "d.jsonl").write_text(json.dumps({"conversations": messages}) + "\n")
    trained = {}
    for name, kwargs in (("default", "null"), ("no_thinking", '{"enable_thinking": false}')):
        cfg = C.load_config(None, [f"data.train_files={tmp_path / 'd.jsonl'}", f"output_dir={tmp_path / name}",
                                   f"data.chat_template_kwargs={kwargs}", "data.columns=messages=conversations"])
        (train_dir, split), _ = prepare_data(cfg, qwen3, DistInfo(), lambda _: None)
        ids, mask = open_shards(train_dir, split)[0]
        trained[name] = trained_text(qwen3, np.asarray(ids), np.asarray(mask))
    assert trained == {"default": ["<think>\n\n</think>\n\nfinal<|im_end|>"], "no_thinking": ["final<|im_end|>"]}


def test_plain_texts_encode_as_transformers_does(qwen3, llama3):
    rng = random.Random(3)
    for tok in (qwen3, llama3):
        for _ in range(50):
            text = " ".join(rng.choice(PIECES + ["<|im_end|>", "<|eot_id|>"]) for _ in range(rng.randint(1, 12)))
            ids, mask = tok.encode_text(text)
            reference = list(tok.tok(text, add_special_tokens=True)["input_ids"])
            assert ids.tolist() == reference + ([tok.eos_id] if reference[-1:] != [tok.eos_id] else [])
            assert mask[1:].all() and mask[0] == 0


def test_llama3_masks_match_trl_training_template(llama3):
    chat_templates = importlib.resources.files("trl") / "chat_templates"
    if (chat_templates / "llama3.jinja").read_text() != llama3.tok.chat_template:
        pytest.skip("this Llama 3 template is not the one TRL ships a training variant of")
    marked = (chat_templates / "llama3_training.jinja").read_text()
    MARKED[id(llama3)] = {llama3.tok.chat_template: marked}
    for messages in conversations("llama3", 40):
        check(llama3, messages)


# ---------------------------------------------------------------------------------------------- other families

GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<start_of_turn>model\n' }}{% generation %}{{ m['content'] | trim }}{{ '<end_of_turn>' }}{% endgeneration %}"
    "{{ '\n' }}{% else %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL = (  # no assistant header at all: the turn is its content and </s>
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'system' %}{{ '[SYS]' + m['content'] + '[/SYS]' }}"
    "{% else %}{% generation %}{{ m['content'] + '</s>' }}{% endgeneration %}{% endif %}{% endfor %}"
)
DEEPSEEK_R1 = (  # drops the reasoning of every assistant turn; the generation prompt opens a think block
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}{% else %}{% set c = m['content'] %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' }}{% generation %}{{ c + '<｜end▁of▁sentence｜>' }}{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"
)
REWRITING = (  # trims, upper-cases and collapses blank lines in answers; renders reasoning_content when present
    "{% for m in messages %}{{ '### ' + m['role'] + ':\n' }}{% if m['role'] == 'assistant' %}{% generation %}"
    "{% if m.reasoning_content %}{{ '(thinking: ' + m.reasoning_content | trim + ')\n' }}{% endif %}"
    "{{ m['content'] | trim | replace('\n\n', '\n') | upper + '<|endoftext|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)
STYLES = {"gemma": GEMMA, "mistral": MISTRAL, "deepseek_r1": DEEPSEEK_R1, "rewriting": REWRITING}


@pytest.mark.parametrize("style", list(STYLES))
def test_other_template_families_match_the_reference(qwen3, style):
    tok = qwen3.with_chat_template(STYLES[style])
    for messages in conversations(style, 25):
        if style == "mistral":  # strictly alternating user/assistant, as Mistral templates require
            messages = [m for k, m in enumerate(messages) if k == 0 or m["role"] != messages[k - 1]["role"]]
        check(tok, messages)


USER_REWRITING = (  # upper-cases what users write: a shape skeleton never matches, each conversation is placed alone
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m['content'] | upper }}"
    "{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


@pytest.mark.parametrize("style", ["own", "llama3", *STYLES, "user_rewriting"])
def test_shape_layout_places_exactly_as_placing_alone(qwen3, llama3, style):
    """Every conversation placed through its shape layout (a cache that starts empty) gives the placement the
    conversation gets alone, for every template; a template that rewrites what users write is placed alone."""
    from fastsft.data.chat_template import ShapeCache, place_assistant_turns

    tok = {"own": qwen3, "llama3": llama3}.get(style) or qwen3.with_chat_template(
        USER_REWRITING if style == "user_rewriting" else STYLES[style])
    shapes = ShapeCache()
    renders = []

    def render(m, gen):
        renders.append(1)
        return tok.render(m, gen)

    for messages in conversations(style, 40):
        if style == "mistral":
            messages = [m for k, m in enumerate(messages) if k == 0 or m["role"] != messages[k - 1]["role"]]
        wanted = {i for i, m in enumerate(messages) if m["role"] == "assistant"}
        alone = place_assistant_turns(render, messages, tok.probe(), wanted, tok._structural)
        assert place_assistant_turns(render, messages, tok.probe(), wanted, tok._structural, shapes) == alone
    if style in ("rewriting", "user_rewriting"):  # content rewritten: a verbatim match only where nothing changed
        assert shapes.placed + shapes.mismatched == 40 and shapes.mismatched >= 30
    else:
        assert shapes.placed == 40 and shapes.mismatched == 0


def test_user_rewriting_template_masks_match_the_reference(qwen3):
    tok = qwen3.with_chat_template(USER_REWRITING)
    for messages in conversations("user_rewriting", 80):  # 80 > 64: the cache gives up on this template part-way
        check(tok, messages)
    assert not tok.shapes.enabled and tok.shapes.mismatched >= 64


def test_conversations_of_one_shape_share_one_skeleton_rendering(qwen3):
    from fastsft.data.chat_template import ShapeCache, place_assistant_turns

    rng = random.Random(7)
    renders = []

    def render(m, gen):
        renders.append(1)
        return qwen3.render(m, gen)

    shapes = ShapeCache()
    for k in range(30):
        messages = [{"role": "system", "content": f"You are helper {k}."}]
        for _ in range(2):
            messages += [{"role": "user", "content": " ".join(rng.choice(PIECES).strip() or "x" for _ in range(3))},
                         {"role": "assistant", "content": rng.choice(PIECES).strip() or "y"}]
        renders.clear()
        placement = place_assistant_turns(render, messages, qwen3.probe(), {2, 4}, qwen3._structural, shapes)
        assert len(renders) == (2 if k == 0 else 1)  # the real text, plus the shape skeleton the first time only
        assert placement == place_assistant_turns(render, messages, qwen3.probe(), {2, 4}, qwen3._structural)
    assert (shapes.rendered, shapes.placed) == (1, 30)


def test_deepseek_reasoning_not_rendered_is_reported(qwen3):
    tok = qwen3.with_chat_template(DEEPSEEK_R1)
    messages = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "<think>add</think>5"}]
    placement = tok.place(messages, {1})
    assert placement.reasoning_dropped == [1]


def test_earlier_reasoning_keep_adds_one_document_per_turn(qwen3):
    messages = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5", "reasoning_content": "add"},
                {"role": "user", "content": "4+4?"}, {"role": "assistant", "content": "8", "reasoning_content": "add"}]
    (whole,) = qwen3.encode_documents(messages, "all")
    assert trained_text(qwen3, *whole) == ["5<|im_end|>", "<think>\nadd\n</think>\n\n8<|im_end|>"]
    whole, first = qwen3.encode_documents(messages, "all", earlier_reasoning="keep")
    assert trained_text(qwen3, *whole) == ["<think>\nadd\n</think>\n\n8<|im_end|>"]
    assert trained_text(qwen3, *first) == ["<think>\nadd\n</think>\n\n5<|im_end|>"]
    assert first[0].tolist() == qwen3.tok.apply_chat_template(messages[:2], tokenize=True, return_dict=False)


def test_turn_that_cannot_be_placed_is_an_error_naming_it(qwen3):
    reversed_order = ("{% for m in messages | reverse %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                      "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                      "{% endif %}")
    tok = qwen3.with_chat_template(reversed_order)
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    with pytest.raises(DataError, match=r"assistant turn 2 \(message 4\)"):
        tok.encode_conversation(messages)
    with pytest.raises(DataError, match=r"assistant turn 2 \(message 4\)"):
        tok.encode_conversation(messages, "last")
    # a turn that can be placed and checked trains when it is the only one asked for
    messages[3]["train"] = False
    ids, mask = tok.encode_conversation(messages)
    assert trained_text(tok, ids, mask) == ["a1<|im_end|>"]


def test_per_message_train_flag_and_trl_prompt_completion(qwen3):
    record = {"prompt": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                         {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "text", "text": "2"}]}],
              "completion": [{"role": "assistant", "content": "a2"}]}
    doc = normalize_record(record, "prompt-completion")
    assert doc[2]["content"] == "q2" and doc[1]["train"] is False
    ids, mask = qwen3.encode_conversation(doc)
    assert trained_text(qwen3, ids, mask) == ["<think>\n\n</think>\n\na2<|im_end|>"]
    doc = normalize_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"},
                                         {"role": "user", "content": "r"},
                                         {"role": "assistant", "content": "y", "train": False}]}, "messages")
    ids, mask = qwen3.encode_conversation(doc, "last")
    assert trained_text(qwen3, ids, mask) == []
    ids, mask = qwen3.encode_conversation(doc, "all")
    assert trained_text(qwen3, ids, mask) == ["x<|im_end|>"]


def test_prepare_locates_unplaceable_turns_and_counts_per_file(qwen3, tmp_path):
    from fastsft.data.prepare import prepare_dataset

    tok = qwen3.with_chat_template(
        "{% for m in messages | reverse %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}")
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}]}
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [good, good, bad, good]) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'messages': assistant turn 2 \(message 4\)"):
        prepare_dataset([data], tok, tmp_path / "out", progress=False)
    manifest = prepare_dataset([data], tok, tmp_path / "out2", progress=False, skip_bad=True)
    assert manifest["records"]["skipped_bad"] == 1
    (entry,) = manifest["data_files"]
    assert entry["trained_turns"] == 3 and entry["records_kept"] == 3
    assert entry["trained_tokens"] == manifest["splits"]["train"]["loss_tokens"]


def test_prepare_warns_about_reasoning_not_rendered_and_keeps_it_on_request(qwen3, tmp_path):
    from fastsft.data.prepare import prepare_dataset
    from fastsft.data.shards import open_shards

    record = {"messages": [{"role": "user", "content": "2+3?"},
                           {"role": "assistant", "content": "5", "reasoning_content": "add"},
                           {"role": "user", "content": "4+4?"},
                           {"role": "assistant", "content": "8", "reasoning_content": "add"}]}
    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps(record) + "\n")
    manifest = prepare_dataset([data], qwen3, tmp_path / "a", progress=False)
    assert any("1 trained assistant turn(s) carry reasoning" in w for w in manifest["warnings"])
    manifest = prepare_dataset([data], qwen3, tmp_path / "b", progress=False, earlier_reasoning="keep")
    assert manifest["warnings"] == [] and manifest["splits"]["train"]["documents"] == 2
    assert manifest["data_files"][0]["trained_turns"] == 2
    documents = open_shards(tmp_path / "b")
    assert len(documents) == 2


def test_inspect_marks_exactly_the_trained_tokens(tmp_path, capsys):
    from fastsft.cli import main
    from fastsft.data.prepare import prepare_dataset

    records = [{"messages": [{"role": "user", "content": "q[[1]]"}, {"role": "assistant", "content": "first"},
                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "sécond 数据"}]},
               {"prompt": "p", "completion": "c"}]
    files = []
    for k, record in enumerate(records):
        files.append(tmp_path / f"d{k}.jsonl")
        files[-1].write_text(json.dumps(record, ensure_ascii=False) + "\n")
    prepare_dataset(files, "byte", tmp_path / "out", progress=False)
    assert main(["inspect", str(tmp_path / "out"), "-n", "5", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "<|user|>q[[1]]<|end|><|assistant|>[[first<|end|>]]<|user|>q2<|end|><|assistant|>[[sécond 数据<|end|>]]" \
        in out
    assert "<|assistant|>[[c<|end|>]]" in out and "2 documents" in out
    assert main(["inspect", str(tmp_path / "out"), "--color", "always"]) == 0
    assert "\033[32mfirst<|end|>\033[0m" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "out"), "--start", "9"]) == 1


def test_prepare_locates_a_lone_surrogate_with_a_real_tokenizer(qwen3, tmp_path):
    """The batch encode on the pipelining thread fails for the whole chunk; the chunk is then encoded record by
    record, which names the record, and --skip-bad keeps the others."""
    from fastsft.data.prepare import prepare_dataset

    lines = ['{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "yes"}]}'
             % ("bad \\ud800 here" if i == 3 else f"ok {i}") for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:4: field 'messages\[0\]\.content': holds a lone surrogate"):
        prepare_dataset(tmp_path / "d.jsonl", qwen3, tmp_path / "a", progress=False)
    manifest = prepare_dataset(tmp_path / "d.jsonl", qwen3, tmp_path / "b", progress=False, skip_bad=True)
    assert manifest["records"]["skipped_bad"] == 1 and manifest["splits"]["train"]["documents"] == 4
