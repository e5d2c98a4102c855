"""Items → greedy answers, in batches of a fixed size, with a progress bar.

Each item is prepared alone (`serve.rows.prepare`: images decoded, prompt tokenised and checked), so a
bad row becomes a `Skip` with its reason and the rest of its batch still runs. Every batch is padded to
`batch` rows (the last row repeated), so one compiled program serves the whole file; images are decoded
one batch at a time, so memory does not grow with the file.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence, TextIO

from tqdm import tqdm

from dsvl_jax.eval.formats import Item, Skip
from dsvl_jax.processing.chat import IMAGE_TAG
from dsvl_jax.serve import rows as R


def conversation(item: Item) -> list[dict]:
    """The prompt: one image placeholder per image in front of the question, then the answer to write."""
    return [{"role": "User", "content": IMAGE_TAG * len(item.images) + item.question, "images": list(item.images)},
            {"role": "Assistant", "content": ""}]


def answer_all(vlm, processor, items: Sequence[Item], *, batch: int, max_new_tokens: int,
               max_images: Optional[int] = None, progress: bool = True, err: TextIO = None,
               system_prompt: Optional[str] = None) -> tuple[dict, list[Skip], float]:
    """({item id: answer text}, skips, seconds of generation). `system_prompt`: None = the processor's."""
    tok = processor.tokenizer
    limit = R.default_max_images(vlm.config) if max_images is None else max_images
    answers, skips, seconds = {}, [], 0.0
    bar = tqdm(total=len(items), unit="prompt", file=err or sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            ready, rows = [], []
            for item in chunk:
                try:
                    rows.append(R.prepare(processor, conversation(item), max_new_tokens=max_new_tokens,
                                          max_images=limit, system_prompt=system_prompt))
                    ready.append(item)
                except R.PrepareError as e:
                    skips.append(Skip(item.row, str(e)))
            if rows:
                t0 = time.perf_counter()
                out = R.generate(vlm, rows, max_new_tokens=max_new_tokens, eos_id=tok.eos_id, pad_to=batch)
                seconds += time.perf_counter() - t0
                for item, ids in zip(ready, out):
                    answers[item.id] = tok.decode(R.until_eos(ids, tok.eos_id)).strip()
            bar.update(len(chunk))
    finally:
        bar.close()
    return answers, skips, seconds
