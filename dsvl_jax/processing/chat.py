"""The official `deepseek` chat format (reference doc §2.3), as a string and as loss-mask segments.

Rendering, as `Conversation.get_prompt` with `sep_style=DeepSeek` followed by `.strip()`:

    <system>\\n\\nUser: <content>\\n\\nAssistant: <content><｜end▁of▁sentence｜>User: ...\\n\\nAssistant:

Every content is stripped; a turn with empty content renders as `Role:` with no separator (the
generation prompt); the whole string is stripped at the end (so a conversation that ends with a
user turn loses its trailing "\\n\\n"). Roles must alternate User/Assistant starting with User (the
official code picks the separator by message index, so anything else renders nonsense); only the
last turn may be empty, and only if it is the assistant's. Lower-case role names are accepted and
rendered capitalised (the official code would print them as given).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
IMAGE_TAG = "<image_placeholder>"
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "User", "Assistant"
USER_SEP = "\n\n"       # after a user turn and after the system text
ASSISTANT_SEP = EOS_TOKEN  # after an assistant turn (no newline follows)
STOP_STRINGS = ("User:", EOS_TOKEN)

Segment = tuple[str, str]  # (text, role) with role in {"system", "user", "assistant"}


def canonical_role(role: str, where: str = "message") -> str:
    """'User'/'user' → 'User', 'Assistant'/'assistant' → 'Assistant'; anything else is an error."""
    for name in (USER, ASSISTANT):
        if role in (name, name.lower()):
            return name
    raise ValueError(f"{where}: role must be 'User' or 'Assistant' (or lower case), got {role!r}")


def _turns(conversation: Sequence[Mapping]) -> list[tuple[str, str]]:
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise TypeError("conversation must be a list of {'role', 'content'} dicts, "
                        f"got {type(conversation).__name__}")
    if not conversation:
        raise ValueError("conversation is empty")
    turns = []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {message!r}")
        role = canonical_role(message["role"], f"message {i}")
        expected = USER if i % 2 == 0 else ASSISTANT
        if role != expected:
            raise ValueError(f"message {i}: expected role {expected!r} (turns alternate User/Assistant, "
                             f"starting with User), got {message['role']!r}")
        content = message.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        content = content.strip()
        last = i == len(conversation) - 1
        if not content and not (last and role == ASSISTANT):
            raise ValueError(f"message {i} ({role}): empty content; only the last, assistant turn may be "
                             "empty (it asks the model to answer)")
        turns.append((role, content))
    return turns


def render_segments(conversation: Sequence[Mapping], *, system_prompt: str = SYSTEM_PROMPT) -> list[Segment]:
    """`format_prompt`'s string cut into (text, role) pieces whose concatenation is exactly that string.

    role "assistant" marks what SFT supervises: each answer with the space after `Assistant:` and its
    `<｜end▁of▁sentence｜>`. The `User: ` and `\\n\\nAssistant:` headers belong to the user turn (the
    model never writes them); the system text and its separator are "system". Segment boundaries
    fall before a space or next to a special token, so they are token boundaries for the byte-level
    BPE (`Tokenizer.encode_segments` assigns tokens by character offsets anyway).
    """
    segments: list[Segment] = []
    if system_prompt:
        segments.append((system_prompt + USER_SEP, "system"))
    for role, content in _turns(conversation):
        if role == USER:
            segments.append((f"{USER}: {content}{USER_SEP}", "user"))
        elif content:
            segments.append((f"{ASSISTANT}:", "user"))
            segments.append((f" {content}{ASSISTANT_SEP}", "assistant"))
        else:
            segments.append((f"{ASSISTANT}:", "user"))
    # The official code strips the whole prompt: only the outer ends can change.
    first_text, first_role = segments[0]
    segments[0] = (first_text.lstrip(), first_role)
    last_text, last_role = segments[-1]
    segments[-1] = (last_text.rstrip(), last_role)
    return [(t, r) for t, r in segments if t]


def format_prompt(conversation: Sequence[Mapping], *, system_prompt: str = SYSTEM_PROMPT) -> str:
    """The official `deepseek` sft_format string (before BOS) for a conversation."""
    return "".join(text for text, _ in render_segments(conversation, system_prompt=system_prompt))


# The same format as a Jinja chat template for transformers (`chat_template.jinja` of an HF export): HF
# messages (roles system / user / assistant; content a string or a list of {"type": "text" | "image"}
# parts, an image rendering as the placeholder in place). Turn contents and the whole prompt are stripped
# as above (the system text only by the final strip); `add_generation_prompt` appends the empty assistant
# turn. Renders what it is given: no system message, no system text.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(out='', text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- set ns.text = '' -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + 'IMAGE_TAG' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- set text = ns.text | trim -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.out = ns.out + ns.text + 'USER_SEP' -%}"
    "{%- elif message['role'] == 'user' -%}{%- set ns.out = ns.out + 'User: ' + text + 'USER_SEP' -%}"
    "{%- elif message['role'] == 'assistant' and text -%}{%- set ns.out = ns.out + 'Assistant: ' + text + 'EOS' -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- set ns.out = ns.out + 'Assistant:' -%}"
    "{%- else -%}{{- raise_exception('roles are system, user and assistant; got ' + message['role']) -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- set ns.out = ns.out + 'Assistant:' -%}{%- endif -%}"
    "{{- ns.out | trim -}}"
).replace("IMAGE_TAG", IMAGE_TAG).replace("USER_SEP", "\\n\\n").replace("EOS", ASSISTANT_SEP)


def conversation_images(conversation: Sequence[Mapping]) -> list:
    """All `images` entries of a conversation in message order (the official `load_pil_images` order)."""
    images: list = []
    for i, message in enumerate(conversation):
        found = message.get("images") if isinstance(message, Mapping) else None
        if found is None:
            continue
        if isinstance(found, (str, bytes)) or not isinstance(found, Iterable):
            raise ValueError(f"message {i}: 'images' must be a list, got {type(found).__name__}")
        images.extend(found)
    return images


def count_image_tags(text: str) -> int:
    return text.count(IMAGE_TAG)
