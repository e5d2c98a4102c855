"""Train small tokenizers with DeepSeek's special tokens, for tests and the demo (no downloads).

`build_bpe_tokenizer` writes a folder laid out like the released DeepSeek-VL one: a byte-level BPE
`tokenizer.json`, `tokenizer_config.json` (LlamaTokenizerFast-style: `add_bos_token`, BOS/EOS
strings, `added_tokens_decoder`, the HF port's `pad_token` = EOS and `image_token`) and
`special_tokens_map.json`, so that `transformers.AutoTokenizer`, `PreTrainedTokenizerFast` and the HF
DeepSeek-VL processors load it. As in the release, the special tokens come after the learned
vocabulary, BOS then EOS then the extras, and `<image_placeholder>` is the last id
(`vocab_size - 1`, which is what `config.tiny()`'s `image_token_id=511` with `vocab_size=512` expects).
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable, Sequence

from dsvl_jax.processing.chat import BOS_TOKEN, EOS_TOKEN, IMAGE_TAG, SYSTEM_PROMPT
from dsvl_jax.processing.tokenizer import SENTENCEPIECE_MODEL, TOKENIZER_JSON, Tokenizer

MODEL_MAX_LENGTH = 16384  # the released tokenizer_config's model_max_length
RESERVED_TEMPLATE = "<｜reserved▁{}｜>"


def _split_path(path, default_name: str) -> tuple[str, str]:
    path = os.fspath(path)
    if path.endswith((".json", ".model")):
        folder = os.path.dirname(path) or "."
        return folder, path
    return path, os.path.join(path, default_name)


def _special_tokens(extra_special_tokens: Sequence[str]) -> list[str]:
    specials = [BOS_TOKEN, EOS_TOKEN, *extra_special_tokens, IMAGE_TAG]
    if len(set(specials)) != len(specials):
        raise ValueError(f"duplicate special tokens in {specials}")
    return specials


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int, path,
                        extra_special_tokens: Sequence[str] = ()) -> Tokenizer:
    """Train a byte-level BPE of exactly `vocab_size` ids on `texts` and save it under `path`.

    `path` is a folder (tokenizer.json and the two config files go in it) or a `.json` file path.
    Ids: learned tokens first, then BOS, EOS, `extra_special_tokens`, `<image_placeholder>` at
    `vocab_size - 1`. When the corpus cannot fill the vocabulary, the gap before the special tokens is
    filled with `<｜reserved▁k｜>` special tokens that never match ordinary text. Returns the loaded
    `Tokenizer`.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer

    specials = _special_tokens(tuple(extra_special_tokens))
    n_bytes = 256
    if vocab_size < n_bytes + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs {n_bytes} byte tokens "
                         f"plus {len(specials)} special tokens")
    texts = [t for t in texts if isinstance(t, str) and t]
    if not texts:
        raise ValueError("build_bpe_tokenizer needs at least one non-empty training text")

    tok = HFTokenizer(models.BPE())
    # DeepSeek-LLM style: newlines isolated, digits one by one, then GPT-2 byte-level words.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\r\n]+"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    learned = vocab_size - len(specials)
    trainer = trainers.BpeTrainer(vocab_size=learned, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    have = tok.get_vocab_size(with_added_tokens=True)
    filler = [RESERVED_TEMPLATE.format(i) for i in range(learned - have)]
    added = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
             for t in filler + specials]
    tok.add_special_tokens(added)
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"built {tok.get_vocab_size(with_added_tokens=True)} ids, expected {vocab_size}")
    bos_id = tok.token_to_id(BOS_TOKEN)
    # LlamaTokenizerFast with add_bos_token=True: BOS before every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1", special_tokens=[(BOS_TOKEN, bos_id)])

    folder, file_path = _split_path(path, TOKENIZER_JSON)
    os.makedirs(folder, exist_ok=True)
    tok.save(file_path)
    _write_hf_configs(folder, tok, specials[2:-1], filler)
    return Tokenizer.from_file(file_path)


def _write_hf_configs(folder: str, tok, extras: Sequence[str], filler: Sequence[str]) -> None:
    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    added_decoder = {str(i): entry(t.content) for i, t in sorted(tok.get_added_tokens_decoder().items())}
    config = {
        # The release says LlamaTokenizerFast; transformers 5 then warns and loads the byte-level json with
        # its generic backend anyway. Naming that backend directly loads the same thing silently.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,  # the HF port's choice; the official processor falls back to EOS too
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "extra_special_tokens": {"image_token": IMAGE_TAG},
        "added_tokens_decoder": added_decoder,
    }
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": [*extras, IMAGE_TAG, *filler],
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, ensure_ascii=False, indent=2)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path) -> Tokenizer:
    """Train a sentencepiece BPE (`path`: a `.model` file or a folder for `tokenizer.model`).

    BOS/EOS are control pieces named as DeepSeek's (ids 1 and 2, `<unk>` 0), `<image_placeholder>` a
    user-defined piece (id 3); no normalisation, whitespace kept as is (the chat format's "\\n\\n"
    survives), byte fallback for unseen characters. With byte fallback `vocab_size` must be ≳ 300.
    """
    import sentencepiece as spm

    lines = [t for t in texts if isinstance(t, str) and t]
    if not lines:
        raise ValueError("train_sentencepiece needs at least one non-empty training text")
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, user_defined_symbols=[IMAGE_TAG],
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, bos_piece=BOS_TOKEN, eos_piece=EOS_TOKEN,
            max_sentence_length=1 << 20, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed for vocab_size={vocab_size}: {e}") from None
    folder, file_path = _split_path(path, SENTENCEPIECE_MODEL)
    os.makedirs(folder, exist_ok=True)
    with open(file_path, "wb") as f:
        f.write(buffer.getvalue())
    return Tokenizer.from_file(file_path)


_CORPUS_WORDS = (
    "the a an of to and in is it that this what which how many where when why who chart table image picture "
    "photo screen button page document figure shows value values total year month red green blue black white "
    "left right top bottom first second third number count answer question describe explain read text title "
    "line bar pie axis label row column cell cat dog person car tree house sky phone app menu click open close "
    "price data trend increase decrease highest lowest average percent equation solve step result because so"
).split()


def sample_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """A deterministic toy corpus in the chat format's register (system text, roles, digits, CJK,
    punctuation and newlines) to train test/demo tokenizers on; no data is downloaded."""
    import random

    rng = random.Random(seed)
    extras = ["你好", "世界", "图表", "✓", "é", "ß", "—", "(", ")", ",", ":", ";", "%", "$", "#", "'s"]
    texts = [SYSTEM_PROMPT, "User:", "Assistant:"]
    for _ in range(n):
        words = [rng.choice(_CORPUS_WORDS) if rng.random() > 0.1 else rng.choice(extras)
                 for _ in range(rng.randint(3, 24))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 100000)))
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ".\n", "\n\n"])
        role = rng.choice(["User: ", "Assistant: ", ""])
        texts.append(role + sentence)
    return texts
