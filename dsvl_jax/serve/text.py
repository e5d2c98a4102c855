"""Generated token ids → the answer text, as it grows: EOS, stop strings and the token budget end it.

`add(token)` returns the text that became final with this token (for a stream). Text is held back
while it could still turn out to be the start of a stop string, or while it ends inside a multi-byte
character (a byte-level BPE token can hold part of one: it decodes to U+FFFD until the rest arrives).
The answer is decoded from all its ids every time, so it equals `decode(ids)` of the whole answer
(leading space stripped, as `dsvl-chat` shows it), cut before the first stop string.
"""
from __future__ import annotations

from typing import Optional, Sequence


class TextAssembler:
    def __init__(self, tokenizer, eos_id: int, max_tokens: int, stop: Sequence[str] = ()):
        self.tokenizer, self.eos_id, self.max_tokens, self.stop = tokenizer, eos_id, max_tokens, tuple(stop)
        self.ids: list[int] = []
        self.tokens = 0  # generated tokens consumed, EOS included (what `usage.completion_tokens` counts)
        self.text = ""  # the answer so far (final once `finish_reason` is set)
        self.sent = 0  # characters of `text` already handed out
        self.finish_reason: Optional[str] = None  # "stop" (EOS or a stop string) or "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _held(self, text: str) -> int:
        """How many trailing characters of `text` must wait: a partial character or a stop-string prefix."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def add(self, token: int) -> str:
        """Consume one generated token; returns the newly final text (may be empty)."""
        if self.finished:
            return ""
        self.tokens += 1
        if int(token) == self.eos_id:
            self.finish_reason = "stop"
            return self._flush()
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids).lstrip()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            self.finish_reason = "stop"
            return self._flush()
        self.text = text
        if self.tokens >= self.max_tokens:
            self.finish_reason = "length"
            return self._flush()
        ready = len(text) - self._held(text)
        if ready <= self.sent:
            return ""
        delta, self.sent = text[self.sent:ready], ready
        return delta

    def close(self) -> str:
        """The generation ended (every row done or the batch's budget spent): whatever was held back."""
        if not self.finished:
            self.finish_reason = "length"
        return self._flush()

    def _flush(self) -> str:
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta

    def feed(self, tokens: Sequence[int]) -> str:
        """All of a row's tokens at once (the non-streaming path); returns the final text."""
        for t in tokens:
            if self.finished:
                break
            self.add(t)
        self.close()
        return self.text
