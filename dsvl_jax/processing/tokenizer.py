"""One tokenizer interface over a HF `tokenizer.json` (DeepSeek's byte-level BPE) or a sentencepiece model.

Special tokens are never split: `<｜begin▁of▁sentence｜>`, `<｜end▁of▁sentence｜>` (fullwidth bars,
U+2581) and `<image_placeholder>` map to one id each wherever they appear in text. BOS is added by
`encode` itself (not by the file's post-processor), so both backends behave the same. PAD falls back
to EOS as in the official processor.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Iterable, Sequence

from dsvl_jax.processing.chat import BOS_TOKEN, EOS_TOKEN, IMAGE_TAG

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"


def _token_text(entry) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


def _resolve_path(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (TOKENIZER_JSON, SENTENCEPIECE_MODEL):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path}: no {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL} in this directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    return path


class Tokenizer:
    """Use `Tokenizer.from_file(path)`; `path` is a tokenizer.json, a `.model` or a folder holding one."""

    def __init__(self, backend, kind: str, *, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                 pad_token: str | None = None, image_token: str = IMAGE_TAG, source: str = "<memory>"):
        if kind not in ("tokenizers", "sentencepiece"):
            raise ValueError(f"unknown tokenizer kind {kind!r}")
        self._backend = backend
        self.kind = kind
        self.source = source
        self.bos_token, self.eos_token, self.image_token = bos_token, eos_token, image_token
        self.bos_id = self._require(bos_token, "BOS")
        self.eos_id = self._require(eos_token, "EOS")
        if kind == "tokenizers" and self.token_to_id(image_token) is None:
            # The official VLChatProcessor does the same: append the tag as a special token.
            from tokenizers import AddedToken

            backend.add_special_tokens([AddedToken(image_token, special=True, normalized=False)])
            warnings.warn(f"{source}: {image_token!r} was not in the vocabulary; added it as id "
                          f"{backend.token_to_id(image_token)} (as the official processor does)")
        self.image_token_id = self._require(image_token, "image placeholder")
        pad = self.token_to_id(pad_token) if pad_token else None
        self.pad_token = pad_token if pad is not None else eos_token
        self.pad_id = pad if pad is not None else self.eos_id
        if kind == "sentencepiece":
            sp = backend
            # Control pieces (BOS/EOS) are never produced from text by sentencepiece itself.
            self._special_ids = {i for i in range(sp.get_piece_size()) if sp.is_control(i)}
        else:
            self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        for tok_id in (self.bos_id, self.eos_id, self.image_token_id):
            self._special_ids.add(tok_id)
        # Text → id for every special string; the sentencepiece path splits text on these itself.
        self._special_text = {self.id_to_token(i): i for i in sorted(self._special_ids)}
        self._special_text = {t: i for t, i in self._special_text.items() if t}
        pattern = "|".join(re.escape(t) for t in sorted(self._special_text, key=len, reverse=True))
        self._special_re = re.compile(f"({pattern})") if pattern else None

    # ---- construction ----
    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """Load `tokenizer.json` (via `tokenizers`) or a sentencepiece `.model`; special token names
        come from a `tokenizer_config.json` beside it when present, else DeepSeek's defaults."""
        path = _resolve_path(path)
        names = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": None, "image_token": IMAGE_TAG}
        config_path = os.path.join(os.path.dirname(path), TOKENIZER_CONFIG)
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            for key in ("bos_token", "eos_token", "pad_token"):
                if _token_text(config.get(key)):
                    names[key] = _token_text(config[key])
            extra = config.get("extra_special_tokens")
            if isinstance(extra, dict) and _token_text(extra.get("image_token")):
                names["image_token"] = _token_text(extra["image_token"])
        try:
            if path.endswith(".model"):
                import sentencepiece as spm

                backend = spm.SentencePieceProcessor(model_file=path)
                kind = "sentencepiece"
            else:
                from tokenizers import Tokenizer as HFTokenizer

                backend = HFTokenizer.from_file(path)
                kind = "tokenizers"
        except Exception as e:
            raise ValueError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from None
        try:
            return cls(backend, kind, source=path, **names)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def _require(self, token: str, what: str) -> int:
        tok_id = self.token_to_id(token)
        if tok_id is None:
            raise ValueError(f"{what} token {token!r} is not in the vocabulary")
        return tok_id

    # ---- vocabulary ----
    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self._backend.get_piece_size()
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "sentencepiece":
            tok_id = self._backend.piece_to_id(token)
            return tok_id if self._backend.id_to_piece(tok_id) == token else None
        return self._backend.token_to_id(token)

    def id_to_token(self, tok_id: int) -> str | None:
        if self.kind == "sentencepiece":
            return self._backend.id_to_piece(int(tok_id)) if 0 <= tok_id < self.vocab_size else None
        return self._backend.id_to_token(int(tok_id))

    @property
    def special_ids(self) -> frozenset:
        return frozenset(self._special_ids)

    # ---- encoding ----
    def _encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids and the character offset where each token starts (no BOS)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # the backends fail on it with a misleading TypeError / RuntimeError
            raise ValueError(f"{self.source}: text is not valid Unicode ({e.reason} at index {e.start})") from None
        if self.kind == "tokenizers":
            enc = self._backend.encode(text, add_special_tokens=False)
            return list(enc.ids), [start for start, _ in enc.offsets]
        ids: list[int] = []
        starts: list[int] = []
        pos = 0
        chunks = self._special_re.split(text) if self._special_re else [text]
        for chunk in chunks:
            if not chunk:
                continue
            if chunk in self._special_text:
                ids.append(self._special_text[chunk])
                starts.append(pos)
            else:
                mapped = self._backend.encode(chunk, return_type="offset_mapping")  # char offsets
                ids.extend(mapped["ids"])
                starts.extend(pos + begin for begin, _ in mapped["offsets"])
            pos += len(chunk)
        return ids, starts

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids, _ = self._encode_with_starts(text)
        return [self.bos_id] + ids if add_bos else ids

    def encode_segments(self, segments: Sequence[tuple[str, str]], add_bos: bool = True
                        ) -> tuple[list[int], list[str]]:
        """Encode the concatenation of `segments` once (ids equal `encode` of the whole string) and give
        each token the role of the segment its first character falls in; BOS gets role "bos"."""
        text = "".join(t for t, _ in segments)
        ids, starts = self._encode_with_starts(text)
        bounds, roles_by_seg, end = [], [], 0
        for seg_text, role in segments:
            end += len(seg_text)
            bounds.append(end)
            roles_by_seg.append(role)
        roles, k = [], 0
        for start in starts:
            while k < len(bounds) - 1 and start >= bounds[k]:
                k += 1
            roles.append(roles_by_seg[k])
        if add_bos:
            return [self.bos_id] + ids, ["bos"] + roles
        return ids, roles

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "tokenizers":
            return self._backend.decode(ids, skip_special_tokens=skip_special)
        out, run = [], []
        for i in ids:
            if i in self._special_ids:
                if run:
                    out.append(self._backend.decode(run))
                    run = []
                if not skip_special:
                    out.append(self.id_to_token(i))
            else:
                run.append(i)
        if run:
            out.append(self._backend.decode(run))
        return "".join(out)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, {self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}, image={self.image_token_id})")

