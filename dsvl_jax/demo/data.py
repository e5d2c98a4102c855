"""The demo's corpora, written through the real data pipeline: task suite → records → ArrayRecord shards.

Four record sets, all tagged with the family name as task tag (so the trainer logs a loss per family):
- `qa`: the suite's requests as conversations (image + question → short answer): the SFT data;
- `transcribe`: the same images with the request "Read everything in the image." answered by a
  transcription of everything drawn (`captions.describe`): SFT data that supervises every string;
- `caption`: the same images with the transcription as a plain document: the image–text pairs of stage 1;
- `text`: the suite's text-only corpus (`tasks.text_corpus`): the language share of stage 2.

Plus the BPE tokenizer, trained on everything the model will read or write, so that `<image_placeholder>`
is its last id. Examples are drawn in worker processes (each is a pure function of its key).
"""
from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import multiprocessing
import os
from typing import Callable, Optional, Sequence

from dsvl_jax import tasks
from dsvl_jax.data import records as R
from dsvl_jax.demo.captions import describe
from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer

# The chat format's system text, shortened: the official one is ~36 tokens of every ~60-token request here,
# i.e. a third of the LM's compute on a CPU. A record's leading system segment replaces the default.
SYSTEM_PROMPT = "Answer briefly."
TRANSCRIBE = "Read everything in the image."
KINDS = ("qa", "transcribe", "caption")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Paths of what `write_corpus` wrote."""

    root: str
    tokenizer: str  # tokenizer.json
    qa: str  # ArrayRecord globs
    transcribe: str
    caption: str
    text: str
    counts: dict
    prior_answers: dict  # (family, question kind) -> its most common train answer: the no-image baseline


def qa_record(example: tasks.Example, png: bytes) -> R.Record:
    """A request as a one-turn conversation; the image leads the user turn as in `tasks.to_conversation`."""
    return R.Record(example.id, "qa", example.task,
                    (R.text(SYSTEM_PROMPT, "system"), R.image(0), R.text(example.question, "user"),
                     R.text(example.answer, "assistant")), (png,))


def transcribe_record(example: tasks.Example, png: bytes) -> R.Record:
    return R.Record(f"{example.id}-read", "transcribe", example.task,
                    (R.text(SYSTEM_PROMPT, "system"), R.image(0), R.text(TRANSCRIBE, "user"),
                     R.text(describe(example), "assistant")), (png,))


def caption_record(example: tasks.Example, png: bytes) -> R.Record:
    return R.Record(f"{example.id}-caption", "caption", example.task, (R.image(0), R.text(describe(example))),
                    (png,))


def text_record(i: int, paragraph: str) -> R.Record:
    return R.Record(f"text-{i}", "text", "text", (R.text(paragraph),))


def _draw(keys: Sequence[tuple[str, int, int]], image_size: int, difficulty: str) -> list[tuple]:
    """Worker: (serialised qa, transcribe, caption records, (family, kind, answer), texts for the tokenizer)
    per key."""
    out = []
    for family, seed, index in keys:
        e = tasks.generate(family, seed, index, image_size, difficulty)
        png = e.png_bytes()
        recs = (qa_record(e, png), transcribe_record(e, png), caption_record(e, png))
        out.append(tuple(R.serialize(r) for r in recs) + ((e.task, e.kind, e.answer),
                                                          (e.question, e.answer, describe(e))))
    return out


def draw_split(keys, image_size: int, difficulty: str, workers: int, progress: Optional[Callable] = None,
               chunk: int = 64) -> list[tuple]:
    chunks = [keys[i:i + chunk] for i in range(0, len(keys), chunk)]
    if workers <= 1 or len(chunks) == 1:
        results = []
        for c in chunks:
            results.append(_draw(c, image_size, difficulty))
            if progress:
                progress(len(c))
        return [x for part in results for x in part]
    # spawn: the parent may already run JAX's threads, which a fork would copy mid-flight.
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        parts = [pool.submit(_draw, c, image_size, difficulty) for c in chunks]
        for p, c in zip(parts, chunks):
            p.add_done_callback(lambda _, n=len(c): progress and progress(n))
        return [x for p in parts for x in p.result()]


def write_corpus(root: str, *, n_train: int, n_text: int, families: Sequence[str], image_size: int, seed: int,
                 difficulty: str, vocab_size: int, num_shards: int = 2, workers: int | None = None,
                 progress: Optional[Callable] = None) -> Corpus:
    """Draw the train split and write the four record sets and the tokenizer under `root`."""
    os.makedirs(root, exist_ok=True)
    keys = tasks.split_keys("train", n_train, families, seed)
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    drawn = draw_split(keys, image_size, difficulty, workers, progress)
    paragraphs = tasks.text_corpus(n_text, seed, families)
    # The system prompt opens every request: repeated so that BPE learns its words (short prompts, cheap steps).
    texts = [f"{SYSTEM_PROMPT}\n\nUser: {TRANSCRIBE}\n\nAssistant:"] * max(64, len(drawn) // 4)
    texts += [t for d in drawn for t in d[-1]] + list(paragraphs)
    tok_dir = os.path.join(root, "tokenizer")
    build_bpe_tokenizer(texts, vocab_size, tok_dir)
    paths = {}
    for k, kind in enumerate(KINDS):
        R.write_records(os.path.join(root, kind), (d[k] for d in drawn), num_shards)
        paths[kind] = os.path.join(root, kind) + "-*.array_record"
    R.write_records(os.path.join(root, "text"), (text_record(i, p) for i, p in enumerate(paragraphs)), num_shards)
    paths["text"] = os.path.join(root, "text") + "-*.array_record"
    counts = {kind: len(drawn) for kind in KINDS} | {"text": len(paragraphs)}
    answers = collections.defaultdict(collections.Counter)
    for d in drawn:
        family, kind, answer = d[len(KINDS)]
        answers[(family, kind)][answer] += 1
    prior = {key: c.most_common(1)[0][0] for key, c in answers.items()}
    return Corpus(root, os.path.join(tok_dir, "tokenizer.json"), counts=counts, prior_answers=prior, **paths)
