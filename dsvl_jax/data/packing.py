"""Packing examples into fixed-length rows with a fixed number of image slots (static shapes under jit).

An example (from `transforms`) is a token sequence with per-token supervision flags and its images.
A row holds up to `max_examples` examples back to back; each gets its own segment id (1..k) and
positions restarting at 0, so that attention stays inside an example. Targets are next tokens
*within* an example: the last token of each example has no target (loss mask 0), which is what
"no loss across segment boundaries" means. Image slots fill in the order their placeholder runs
appear; unused slots are zeros with `image_mask` False.

Examples longer than a row are cut, never inside an image's token run: `truncate` keeps the first
chunk, `split` (documents only, never conversations) carries the rest over into the next rows.
An example whose first image alone does not fit a row is a counted skip.

A stream that skips `max_skips_in_a_row` records without placing one (say every conversation's prompt is
longer than seq_len) can never make a row: the packer raises `TooManySkips`, which says what the skipped
records would need, instead of reading forever. `interrupt` (a callable, e.g. a signal flag) is polled at
every skip, so that a run stuck skipping still stops on SIGTERM / SIGINT (`Interrupted`).

`PackIterDataset` packs greedily in stream order. Its state is the parent's state from just before
the example it holds back (plus how much of that example is already placed), so restoring it
replays the stream exactly; the statistics (skips by reason, truncations, ...) are part of the
state and therefore survive a restart.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable

import grain
import numpy as np

EMPTY_SLOT = -1  # record_index of an unused example slot
CONTINUATION = -2  # record_index of a chunk whose record started in an earlier row

TRUNCATE, SPLIT = "truncate", "split"


@dataclasses.dataclass(frozen=True)
class RowSpec:
    seq_len: int
    max_images: int
    max_examples: int
    num_image_tokens: int
    image_token_id: int
    pad_id: int
    image_size: int  # low-res (SigLIP) view side
    high_res_size: int | None = None  # hybrid only
    long_examples: str = TRUNCATE

    def __post_init__(self):
        if self.seq_len < 2 or self.max_examples < 1 or self.max_images < 0:
            raise ValueError(f"bad row spec: {self}")
        if self.long_examples not in (TRUNCATE, SPLIT):
            raise ValueError(f"long_examples={self.long_examples!r}: expected {TRUNCATE!r} or {SPLIT!r}")

    def zero_row(self) -> dict[str, np.ndarray]:
        t, n, e = self.seq_len, self.max_images, self.max_examples
        row = {
            "input_ids": np.full((t,), self.pad_id, np.int32),
            "targets": np.full((t,), self.pad_id, np.int32),
            "loss_mask": np.zeros((t,), np.float32),
            "positions": np.zeros((t,), np.int32),
            "segment_ids": np.zeros((t,), np.int32),
            "task_ids": np.zeros((t,), np.int32),
            "record_index": np.full((e,), EMPTY_SLOT, np.int32),
            "pixel_values": np.zeros((n, 3, self.image_size, self.image_size), np.float32),
            "image_mask": np.zeros((n,), bool),
        }
        if self.high_res_size is not None:
            row["high_res_pixel_values"] = np.zeros((n, 3, self.high_res_size, self.high_res_size), np.float32)
        return row


# ---------------------------------------------------------------------------------------------
# Counters the trainer logs
# ---------------------------------------------------------------------------------------------
class DataStats:
    """Skips by reason, cut examples and totals; JSON-serialisable, so it rides in the iterator state."""

    RECENT = 8
    COUNTS = ("examples", "rows", "truncated", "split", "dropped_tokens")

    def __init__(self):
        self.skipped: collections.Counter[str] = collections.Counter()
        self.examples = 0  # examples placed in rows (a split example counts once)
        self.rows = 0
        self.truncated = 0  # examples cut by `truncate` (rest dropped)
        self.split = 0  # examples carried over into a following row
        self.dropped_tokens = 0  # tokens lost to truncation
        self.recent: collections.deque = collections.deque(maxlen=self.RECENT)  # last skips, for the log

    def skip(self, reason: str, detail: str = "", source: str = "", record_id: str = "", code: int = -1):
        if not self.skipped[reason]:  # the first of each kind goes to the log; then only the counter
            logging.getLogger(__name__).warning("skipping record %s/%s: %s (%s)", source, record_id, reason, detail)
        self.skipped[reason] += 1
        self.recent.append({"reason": reason, "detail": detail[:300], "source": source,
                            "record_id": record_id, "code": int(code)})

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_state(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped), **{k: getattr(self, k) for k in self.COUNTS},
                "recent": list(self.recent)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DataStats":
        s = cls()
        s.skipped.update(state["skipped"])
        for k in cls.COUNTS:
            setattr(s, k, int(state[k]))
        s.recent.extend(state["recent"])
        return s

    def merged(self, other: "DataStats") -> "DataStats":
        out = DataStats.from_state(self.to_state())
        out.skipped.update(other.skipped)
        for k in self.COUNTS:
            setattr(out, k, getattr(out, k) + getattr(other, k))
        out.recent.extend(other.recent)
        return out

    def as_dict(self) -> dict[str, Any]:
        """Flat scalars for a metrics logger (`data/skipped/<reason>` ...)."""
        d = {f"data/skipped/{r}": n for r, n in sorted(self.skipped.items())}
        d.update({"data/skipped_total": self.total_skipped, "data/examples": self.examples, "data/rows": self.rows,
                  "data/truncated": self.truncated, "data/split": self.split,
                  "data/dropped_tokens": self.dropped_tokens})
        return d

    def __repr__(self) -> str:
        return f"DataStats({self.as_dict()})"


class TooManySkips(Exception):
    """`limit` records in a row were skipped; `reasons` counts them by reason. `need_seq_len` is (least, most)
    row length the skipped records needed to place a supervised token (None when no length would do);
    `need_images` the most image slots they needed; `example` one of them ("source/record_id: detail")."""

    def __init__(self, limit: int, reasons: collections.Counter, need_seq_len: tuple[int, int] | None,
                 need_images: int, example: str):
        self.limit, self.reasons, self.need_seq_len = limit, reasons, need_seq_len
        self.need_images, self.example = need_images, example
        self.stream = ""  # which stream, when the caller knows (the loader: "text", "multimodal@1", ...)
        counts = ", ".join(f"{r}: {n}" for r, n in reasons.most_common())
        super().__init__(f"{limit} records in a row skipped ({counts}); e.g. {example}")


class Interrupted(Exception):
    """The `interrupt` callable said stop while the packer was skipping records."""


def supervised_need(ex: dict, start: int) -> tuple[int, int] | None:
    """(tokens, images) a row must hold for the part of `ex` from `start` on to reach its first supervised
    target, or None if that part has none. Image runs before that target end before it, so a row of that many
    tokens cuts none of them."""
    later = np.flatnonzero(ex["supervised"][start + 1:])
    if not len(later):
        return None
    first = start + 1 + int(later[0])
    images = int(((ex["image_starts"] >= start) & (ex["image_starts"] < first)).sum())
    return first - start + 1, images


# ---------------------------------------------------------------------------------------------
# Row assembly
# ---------------------------------------------------------------------------------------------
def chunk_end(ex: dict, start: int, max_tokens: int, max_images: int, num_image_tokens: int) -> int:
    """Largest end <= start + max_tokens such that [start, end) cuts no image run and holds at most
    `max_images` images. Equal to `start` when nothing fits."""
    end = min(len(ex["ids"]), start + max_tokens)
    starts = ex["image_starts"]
    first = int(np.searchsorted(starts, start))
    if first + max_images < len(starts):
        end = min(end, int(starts[first + max_images]))
    # the run that straddles `end`, if any, moves wholly to the next chunk
    j = int(np.searchsorted(starts, end)) - 1
    if j >= first and starts[j] + num_image_tokens > end:
        end = int(starts[j])
    return max(end, start)


class RowBuilder:
    def __init__(self, spec: RowSpec):
        self.spec = spec
        self.row = spec.zero_row()
        self.length = 0
        self.num_images = 0
        self.num_examples = 0

    @property
    def empty(self) -> bool:
        return self.num_examples == 0

    @property
    def full(self) -> bool:
        return self.length == self.spec.seq_len or self.num_examples == self.spec.max_examples

    def add(self, ex: dict, a: int, b: int) -> None:
        r, n, p = self.row, b - a, self.length
        ids = ex["ids"]
        r["input_ids"][p:p + n] = ids[a:b]
        r["targets"][p:p + n - 1] = ids[a + 1:b]
        r["loss_mask"][p:p + n - 1] = ex["supervised"][a + 1:b]
        r["positions"][p:p + n] = np.arange(n, dtype=np.int32)
        r["segment_ids"][p:p + n] = self.num_examples + 1
        r["task_ids"][p:p + n] = ex["task_id"]
        r["record_index"][self.num_examples] = ex["code"] if a == 0 else CONTINUATION
        for j in np.flatnonzero((ex["image_starts"] >= a) & (ex["image_starts"] < b)):
            slot = self.num_images
            r["pixel_values"][slot] = ex["pixel_values"][j]
            if "high_res_pixel_values" in r:
                r["high_res_pixel_values"][slot] = ex["high_res_pixel_values"][j]
            r["image_mask"][slot] = True
            self.num_images += 1
        self.length += n
        self.num_examples += 1

    def finish(self) -> dict[str, np.ndarray]:
        r, spec = self.row, self.spec
        image_tokens = int((r["input_ids"][: self.length] == spec.image_token_id).sum())
        if image_tokens != self.num_images * spec.num_image_tokens:  # a bug, never a data problem
            raise AssertionError(f"row has {image_tokens} image tokens for {self.num_images} images")
        return r


class PackIterDataset(grain.IterDataset):
    """Examples (or skip markers) -> packed rows; see the module docstring."""

    def __init__(self, parent: grain.IterDataset, spec: RowSpec, *, max_skips_in_a_row: int = 0,
                 interrupt: Callable[[], bool] | None = None):
        super().__init__(parent)
        self._spec = spec
        self._max_skips = max_skips_in_a_row  # 0: no limit
        self._interrupt = interrupt

    def __iter__(self) -> "PackDatasetIterator":
        return PackDatasetIterator(self._parent.__iter__(), self._spec, max_skips_in_a_row=self._max_skips,
                                   interrupt=self._interrupt)

    def __str__(self) -> str:
        return f"PackIterDataset({self._spec})"


class PackDatasetIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: RowSpec, *, max_skips_in_a_row: int = 0,
                 interrupt: Callable[[], bool] | None = None):
        super().__init__(parent)
        self._spec = spec
        self._max_skips, self._interrupt = max_skips_in_a_row, interrupt
        self._run: collections.Counter[str] = collections.Counter()  # skips since the last placed example
        self._run_needs: list[tuple[int, int]] = []  # their supervised_need, where known
        self.stats = DataStats()
        self._pending: dict | None = None  # example held back for the next row
        self._pending_state: Any = None  # parent state from just before `_pending` was read
        self._offset = 0  # tokens of `_pending` already placed (split mode)
        self._restore_offset: int | None = None

    # -- stream -------------------------------------------------------------------------------
    def _pull(self) -> bool:
        """Read the next usable example into `_pending`; False at the end of a finite stream."""
        while True:
            state = self._parent.get_state()
            try:
                el = next(self._parent)
            except StopIteration:
                return False
            if "skip" in el:
                self._skipped(el["skip"], el.get("detail", ""), el.get("source", ""), el.get("record_id", ""),
                              el.get("code", -1))
                continue
            self._pending, self._pending_state = el, state
            self._offset, self._restore_offset = self._restore_offset or 0, None
            return True

    def _drop_pending(self, reason: str, detail: str) -> None:
        ex, self._pending = self._pending, None
        self._skipped(reason, detail, ex.get("source", ""), ex.get("record_id", ""), ex["code"],
                      supervised_need(ex, self._offset))

    def _skipped(self, reason: str, detail: str, source: str, record_id: str, code: int, need=None) -> None:
        self.stats.skip(reason, detail, source, record_id, code)
        self._run[reason] += 1
        if need is not None:
            self._run_needs.append(need)
        if self._interrupt is not None and self._interrupt():
            raise Interrupted(f"interrupted while skipping records ({sum(self._run.values())} in a row)")
        if self._max_skips and sum(self._run.values()) >= self._max_skips:
            lengths = [n for n, _ in self._run_needs]
            raise TooManySkips(self._max_skips, collections.Counter(self._run),
                               (min(lengths), max(lengths)) if lengths else None,
                               max((i for _, i in self._run_needs), default=0),
                               f"{source}/{record_id}: {reason} ({detail})")

    def _place(self, builder: RowBuilder, a: int, b: int) -> None:
        builder.add(self._pending, a, b)
        self._run.clear()
        self._run_needs.clear()
        if a == 0:
            self.stats.examples += 1

    # -- packing ------------------------------------------------------------------------------
    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        spec = self._spec
        builder = RowBuilder(spec)
        while not builder.full:
            if self._pending is None and not self._pull():
                if builder.empty:
                    raise StopIteration
                break
            ex, a = self._pending, self._offset
            total = len(ex["ids"])
            images_left = int((ex["image_starts"] >= a).sum())
            room, image_room = spec.seq_len - builder.length, spec.max_images - builder.num_images
            if total - a <= room and images_left <= image_room:
                self._place(builder, a, total)
                self._pending = None
                continue
            fits_empty_row = total - a <= spec.seq_len and images_left <= spec.max_images
            splitting = spec.long_examples == SPLIT and ex["splittable"]
            if not builder.empty and (fits_empty_row or not splitting):
                break  # starts the next row
            b = chunk_end(ex, a, room, image_room, spec.num_image_tokens)
            has_targets = bool(ex["supervised"][a + 1:b].any())
            if not builder.empty and not has_targets:
                break  # nothing useful fits in what is left of this row
            if splitting and b > a:
                # a chunk, even one without targets (an image run before its text), keeps the record's
                # first appearance in a row, so that record_index logs every record once
                self._place(builder, a, b)
                if a == 0:
                    self.stats.split += 1
                self._offset = b
                if b == total:
                    self._pending = None
                break  # the rest of this example opens the next row
            if not has_targets:  # (the row is empty) nothing of this example can ever be learned from
                if b < total and b in ex["image_starts"]:
                    self._drop_pending("image does not fit in a row",
                                       f"image at token {b}: {spec.num_image_tokens} tokens, seq_len="
                                       f"{spec.seq_len}, max_images={spec.max_images}")
                else:
                    self._drop_pending("nothing supervised within seq_len",
                                       f"{total} tokens, the first {b} hold no supervised token")
                continue
            self._place(builder, a, b)
            self.stats.truncated += 1
            self.stats.dropped_tokens += total - b
            self._pending = None
        self.stats.rows += 1
        return builder.finish()

    # -- checkpointing ------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        if self._pending is None and self._restore_offset is not None:  # restored; the held example is not re-read yet
            return {"parent": self._parent.get_state(), "holding": True, "offset": self._restore_offset,
                    "stats": self.stats.to_state()}
        holding = self._pending is not None
        parent = self._pending_state if holding else self._parent.get_state()
        return {"parent": parent, "holding": holding, "offset": self._offset if holding else 0,
                "stats": self.stats.to_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending, self._pending_state = None, None
        self._offset = 0
        # the held-back example is read again from the parent, with its placed part skipped
        self._restore_offset = int(state["offset"]) if state["holding"] else None
        self.stats = DataStats.from_state(state["stats"])

    def __str__(self) -> str:
        return f"PackDatasetIterator({self._spec})"
