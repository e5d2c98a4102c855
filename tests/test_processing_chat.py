"""The official `deepseek` chat format: hand-written expected strings, multi-turn, loss segments, and the
same format as the Jinja chat template of HF exports."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsvl_jax.processing.chat import (CHAT_TEMPLATE, EOS_TOKEN, IMAGE_TAG, SYSTEM_PROMPT, conversation_images,
                                      format_prompt, render_segments)

SYS = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
       "the user provides, and assist the user with a variety of tasks using natural language.")


def official_get_prompt(conversation, system_prompt):
    """The reference algorithm of doc §2.3 (Conversation.get_prompt, DeepSeek style, then .strip())."""
    seps = ["\n\n", "<｜end▁of▁sentence｜>"]
    ret = "" if not system_prompt else system_prompt + seps[0]
    for i, m in enumerate(conversation):
        message = m["content"].strip()
        ret += (m["role"] + ": " + message + seps[i % 2]) if message else (m["role"] + ":")
    return ret.strip()


def test_system_prompt_is_verbatim():
    assert SYSTEM_PROMPT == SYS
    assert EOS_TOKEN == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert IMAGE_TAG == "<image_placeholder>"


def test_single_turn_generation_prompt():
    conv = [{"role": "User", "content": "<image_placeholder>Describe each stage of this image.",
             "images": ["./images/training_pipelines.jpg"]},
            {"role": "Assistant", "content": ""}]
    expected = (SYS + "\n\nUser: <image_placeholder>Describe each stage of this image.\n\nAssistant:")
    assert format_prompt(conv) == expected
    assert conversation_images(conv) == ["./images/training_pipelines.jpg"]


def test_multi_turn_with_answers():
    conv = [{"role": "user", "content": "  Hello!\n"},
            {"role": "assistant", "content": "Hi! This is Tony. "},
            {"role": "User", "images": ["a.png", "b.png"],
             "content": "<image_placeholder> is Figure 1.\n<image_placeholder> is Figure 2.\nWhich is brighter?"},
            {"role": "Assistant", "content": "The first."},
            {"role": "User", "content": "Why?"},
            {"role": "Assistant", "content": ""}]
    expected = (SYS + "\n\nUser: Hello!\n\nAssistant: Hi! This is Tony.<｜end▁of▁sentence｜>"
                "User: <image_placeholder> is Figure 1.\n<image_placeholder> is Figure 2.\nWhich is brighter?\n\n"
                "Assistant: The first.<｜end▁of▁sentence｜>User: Why?\n\nAssistant:")
    assert format_prompt(conv) == expected
    assert conversation_images(conv) == ["a.png", "b.png"]


def test_sft_sample_ends_with_eos_and_user_last_is_stripped():
    conv = [{"role": "User", "content": "What is 2+2?"}, {"role": "Assistant", "content": "4"}]
    assert format_prompt(conv) == SYS + "\n\nUser: What is 2+2?\n\nAssistant: 4<｜end▁of▁sentence｜>"
    assert format_prompt(conv[:1]) == SYS + "\n\nUser: What is 2+2?"
    assert format_prompt(conv, system_prompt="") == "User: What is 2+2?\n\nAssistant: 4<｜end▁of▁sentence｜>"
    assert format_prompt(conv, system_prompt="  Be brief.  ") == ("Be brief.  \n\nUser: What is 2+2?\n\n"
                                                                  "Assistant: 4<｜end▁of▁sentence｜>")


def test_segments_tag_what_sft_supervises():
    conv = [{"role": "User", "content": "<image_placeholder>Q1"}, {"role": "Assistant", "content": "A1"},
            {"role": "User", "content": "Q2"}, {"role": "Assistant", "content": "A2 long"}]
    segs = render_segments(conv)
    assert "".join(t for t, _ in segs) == format_prompt(conv)
    assert segs == [(SYS + "\n\n", "system"),
                    ("User: <image_placeholder>Q1\n\n", "user"), ("Assistant:", "user"),
                    (" A1<｜end▁of▁sentence｜>", "assistant"),
                    ("User: Q2\n\n", "user"), ("Assistant:", "user"),
                    (" A2 long<｜end▁of▁sentence｜>", "assistant")]
    gen = render_segments(conv[:3] + [{"role": "Assistant", "content": ""}], system_prompt="")
    assert gen[-1] == ("Assistant:", "user") and all(r != "system" for _, r in gen)


@pytest.mark.parametrize("conv, match", [
    ([], "empty"),
    ([{"role": "Assistant", "content": "hi"}], "expected role 'User'"),
    ([{"role": "User", "content": "a"}, {"role": "User", "content": "b"}], "message 1: expected role 'Assistant'"),
    ([{"role": "System", "content": "a"}], "role must be"),
    ([{"role": "USER", "content": "a"}], "role must be"),
    ([{"role": "User", "content": "  "}, {"role": "Assistant", "content": ""}], "message 0 .*empty content"),
    ([{"role": "User", "content": "a"}, {"role": "Assistant", "content": ""}, {"role": "User", "content": "b"}],
     "message 1 .*empty content"),
    ([{"role": "User", "content": 5}], "content must be a string"),
    ([{"content": "a"}], "expected a dict with 'role'"),
])
def test_bad_conversations(conv, match):
    with pytest.raises(ValueError, match=match):
        format_prompt(conv)


def test_images_must_be_lists():
    with pytest.raises(ValueError, match="'images' must be a list"):
        conversation_images([{"role": "User", "content": "x", "images": "a.png"}])


_text = st.lists(st.sampled_from(list("ab c\n\t.:<>") + ["<image_placeholder>", "é", "你"]), max_size=12).map("".join)


@settings(max_examples=200, deadline=None)
@given(st.lists(_text.filter(lambda s: s.strip()), min_size=1, max_size=6), st.booleans(),
       st.sampled_from(["", SYS, "  spaced system  "]))
def test_matches_the_reference_algorithm(contents, ask, system):
    conv = [{"role": "User" if i % 2 == 0 else "Assistant", "content": c} for i, c in enumerate(contents)]
    if ask and conv[-1]["role"] == "User":
        conv.append({"role": "Assistant", "content": ""})
    assert format_prompt(conv, system_prompt=system) == official_get_prompt(conv, system)
    segs = render_segments(conv, system_prompt=system)
    assert "".join(t for t, _ in segs) == official_get_prompt(conv, system)
    answers = [t for t, r in segs if r == "assistant"]
    expected = [" " + m["content"].strip() + EOS_TOKEN for m in conv if m["role"] == "Assistant" and m["content"]]
    assert answers == expected


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' own template renderer: a tokenizer (trained here) carrying our chat template."""
    from transformers import AutoTokenizer

    from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer, sample_corpus
    folder = tmp_path_factory.mktemp("chat_template")
    build_bpe_tokenizer(sample_corpus(50), 300, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _hf_message(role: str, content: str, as_parts: bool) -> dict:
    """An HF chat message: the content as a string, or as text parts with an image part per placeholder."""
    if not as_parts:
        return {"role": role.lower(), "content": content}
    parts = []
    for i, piece in enumerate(content.split(IMAGE_TAG)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return {"role": role.lower(), "content": parts}


@settings(max_examples=60, deadline=None)
@given(st.lists(_text.filter(lambda s: s.strip()), min_size=1, max_size=5), st.sampled_from(["none", "flag", "turn"]),
       st.sampled_from(["", SYS, "  spaced system  "]), st.booleans())
def test_chat_template_renders_the_same_prompt(hf_tokenizer, contents, ask, system, as_parts):
    """The chat_template.jinja of HF exports, rendered by transformers, is `format_prompt` for HF messages."""
    conv = [{"role": "User" if i % 2 == 0 else "Assistant", "content": c} for i, c in enumerate(contents)]
    if ask == "turn" and conv[-1]["role"] == "User":
        conv.append({"role": "Assistant", "content": ""})
    messages = ([{"role": "system", "content": system}] if system else []) + [
        _hf_message(m["role"], m["content"], as_parts) for m in conv]
    flag = ask == "flag" and conv[-1]["role"] == "User"
    rendered = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=flag, tokenize=False)
    expected = conv + [{"role": "Assistant", "content": ""}] if flag else conv
    assert rendered == format_prompt(expected, system_prompt=system)
