"""`dsvl-data`: convert public corpus formats into validated record shards.

    dsvl-data --format llava --input llava.json --image-root images/ --output out/sft --source llava
    dsvl-data --format caption --input sharegpt4v.json --image-root images/ --output out/cap
    dsvl-data --format interleaved --input docs.jsonl --image-root images/ --output out/docs
    dsvl-data --format text --input corpus.jsonl --input more.txt --output out/text --spm-model out/spm.model
    dsvl-data check 'out/sft-*'          # shards as the loader resolves them, checked against the manifest

Formats:
  llava        JSON list of {"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt"|"system",
               "value": "...<image>..."}]}: one `<image>` tag per image, in order -> a conversation (SFT).
  caption      JSON list (or JSONL) of {"id", "image", "caption" | "text"} or ShareGPT4V-style
               {"id", "image", "conversations": [..., {"from": "gpt", "value": caption}]} -> image + caption.
  interleaved  JSONL of {"id", "content" | "segments": [{"type": "text", "text"} | {"type": "image",
               "image"}, ...]} (the "type" key may be omitted) -> an interleaved document.
  text         JSONL of {"id", "text"}, or .txt files with documents separated by blank lines.

Every record is validated before it is written — images are decoded with the processor's own loader,
paths must stay inside --image-root, text must be UTF-8, placeholders must match images, a
conversation must render in the chat template — and a rejected one is counted under its reason. The
report (printed, and written next to the shards as `<output>.report.json`) lists them.

Beside the shards goes `<output>.manifest.json`: shard names, record counts and sizes, and this
build's arguments. The loader reads only the shards it lists, so a rebuild into the same prefix with
another --num-shards replaces the set: the old shards are removed (and named in the output).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Iterable, Iterator

from ..processing import chat
from ..processing import image as image_lib
from ..processing.tokenizer_build import train_sentencepiece
from . import records as R
from . import shards as S
from .transforms import image_error_reason, to_conversation

FORMATS = ("llava", "caption", "interleaved", "text")
DEFAULT_TASK = {"llava": "sft", "caption": "caption", "interleaved": "interleaved", "text": "text"}
LLAVA_TAG = "<image>"
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


Reject = R.RecordError  # an input entry that cannot become a record: a countable reason + detail


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
class ImageFolder:
    """Reads images referenced by relative paths, refusing any that resolve outside the root."""

    def __init__(self, root: str | None, max_pixels: int):
        self.root = os.path.realpath(root) if root else None
        self.max_pixels = max_pixels

    def read(self, ref: Any) -> bytes:
        if not isinstance(ref, str) or not ref:
            raise Reject("malformed entry", f"image reference {ref!r} is not a path")
        if self.root is None:
            raise Reject("malformed entry", "the entry references an image but no --image-root was given")
        path = os.path.realpath(os.path.join(self.root, ref))  # also resolves symlinks and '..'
        if os.path.commonpath([self.root, path]) != self.root:
            raise Reject("image path outside image root", f"{ref!r} resolves to {path}")
        if not os.path.isfile(path):
            raise Reject("missing image file", ref)
        with open(path, "rb") as f:
            data = f.read()
        check_image(data, ref, self.max_pixels)
        return data


def check_image(data: bytes, name: str, max_pixels: int) -> None:
    """Decode fully and convert to RGB with the processor's code (what the loader will do)."""
    try:
        img = image_lib.load_image(data, name=name, max_pixels=max_pixels)
        image_lib.to_rgb(img, (0, 0, 0), name=name)
    except image_lib.ImageError as e:
        raise Reject(image_error_reason(e), str(e)) from None


# ---------------------------------------------------------------------------------------------
# Converters: one input entry -> Record (or Reject)
# ---------------------------------------------------------------------------------------------
def _entry_id(entry: Any, fallback: str) -> str:
    if isinstance(entry, dict) and entry.get("id") not in (None, ""):
        return str(entry["id"])
    return fallback


def _image_list(entry: dict) -> list:
    refs = entry.get("image", entry.get("images"))
    if refs is None:
        return []
    return list(refs) if isinstance(refs, list) else [refs]


def _split_tagged(text: str, tag: str, role: str | None, next_image: int) -> tuple[list[R.Segment], int]:
    segs: list[R.Segment] = []
    for i, piece in enumerate(text.split(tag)):
        if i:
            segs.append(R.image(next_image))
            next_image += 1
        if piece:
            segs.append(R.text(piece, role))
    return segs, next_image


def llava_segments(entry: dict) -> tuple[list[R.Segment], list]:
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise Reject("malformed entry", "no 'conversations' list")
    refs, segs, k = _image_list(entry), [], 0
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise Reject("malformed entry", f"turn {t} has no string 'value'")
        role = _LLAVA_ROLES.get(turn.get("from"))
        if role is None:
            raise Reject("malformed entry", f"turn {t} has unknown speaker {turn.get('from')!r}")
        if t and _LLAVA_ROLES.get(turns[t - 1].get("from")) == role:
            # records merge same-role segments into one turn; two turns in a row are a broken conversation
            raise Reject("malformed conversation", f"turns {t - 1} and {t} are both {role}")
        piece, k = _split_tagged(turn["value"], LLAVA_TAG, role, k)
        segs += piece
    if k != len(refs):
        raise Reject("image count mismatch", f"{k} {LLAVA_TAG} tag(s) for {len(refs)} image(s)")
    return segs, refs


def caption_segments(entry: dict) -> tuple[list[R.Segment], list]:
    refs = _image_list(entry)
    caption = entry.get("caption", entry.get("text"))
    if caption is None and isinstance(entry.get("conversations"), list):
        answers = [t.get("value") for t in entry["conversations"] if isinstance(t, dict) and t.get("from") == "gpt"]
        caption = answers[-1] if answers else None
    if not isinstance(caption, str):
        raise Reject("malformed entry", "no caption ('caption', 'text' or a gpt turn)")
    if len(refs) != 1:
        raise Reject("image count mismatch", f"a caption pair needs one image, got {len(refs)}")
    return [R.image(0), R.text(caption.replace(LLAVA_TAG, "").strip())], refs


def interleaved_segments(entry: dict) -> tuple[list[R.Segment], list]:
    items = entry.get("content", entry.get("segments"))
    if not isinstance(items, list) or not items:
        raise Reject("malformed entry", "no 'content' list")
    segs, refs = [], []
    for i, item in enumerate(items):
        kind = item.get("type") if isinstance(item, dict) else None
        if isinstance(item, dict) and (kind == "image" or (kind is None and "image" in item)):
            refs.append(item.get("image", item.get("path")))
            segs.append(R.image(len(refs) - 1))
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            if item["text"]:
                segs.append(R.text(item["text"]))
        else:
            raise Reject("malformed entry", f"content item {i} is neither text nor image")
    return segs, refs


def text_segments(entry: dict) -> tuple[list[R.Segment], list]:
    if not isinstance(entry.get("text"), str):
        raise Reject("malformed entry", "no string 'text'")
    return [R.text(entry["text"])], []


SEGMENTERS = {"llava": llava_segments, "caption": caption_segments, "interleaved": interleaved_segments,
              "text": text_segments}


def check_renders(rec: R.Record) -> None:
    """Text must not contain the model's own image tag, and a conversation must fit the chat template."""
    for seg in rec.segments:
        if not seg.is_image and chat.IMAGE_TAG in seg.text:
            raise Reject("image count mismatch", f"text contains the literal {chat.IMAGE_TAG}")
    if rec.is_conversation:
        try:
            conversation, system = to_conversation(rec)
            chat.render_segments(conversation, system_prompt=system)
        except ValueError as e:
            raise Reject("malformed conversation", str(e)) from None


def make_record(entry: Any, fmt: str, *, where: str, source: str, task: str, images: ImageFolder) -> R.Record:
    if not isinstance(entry, dict):
        raise Reject("malformed entry", f"expected an object, got {type(entry).__name__}")
    segs, refs = SEGMENTERS[fmt](entry)
    blobs = tuple(images.read(ref) for ref in refs)
    rec = R.Record(record_id=_entry_id(entry, where), source=source, task=task, segments=tuple(segs), images=blobs)
    R.validate(rec)
    check_renders(rec)
    return rec


# ---------------------------------------------------------------------------------------------
# Reading inputs (bytes that are not UTF-8 become lone surrogates, caught per record by `validate`)
# ---------------------------------------------------------------------------------------------
def read_entries(path: str, fmt: str) -> Iterator[tuple[str, Any]]:
    """(where, entry) pairs; `entry` is a Reject for a line that cannot be parsed."""
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", "surrogateescape")
    name = os.path.basename(path)
    if path.endswith(".txt"):
        docs = [d.strip("\n") for d in text.replace("\r\n", "\n").split("\n\n")]
        for i, doc in enumerate(d for d in docs if d.strip()):
            yield f"{name}:doc{i}", {"id": f"{name}:doc{i}", "text": doc}
        return
    if path.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{name}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{name}:{n}", Reject("malformed entry", f"line {n}: {e}")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); use .jsonl for one entry per line") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        yield f"{name}[{i}]", entry


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BuildReport:
    written: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    outputs: list = dataclasses.field(default_factory=list)
    removed: list = dataclasses.field(default_factory=list)  # stale shards of the prefix, deleted

    def reject(self, where: str, err: Reject) -> None:
        self.skipped[err.reason] += 1
        if len(self.examples[err.reason]) < 5:
            self.examples[err.reason].append(f"{where}: {err.detail}"[:300])

    def to_dict(self) -> dict:
        return {"written": self.written, "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
                "examples": dict(self.examples), "outputs": self.outputs, "removed": self.removed}

    def format(self) -> str:
        lines = [f"records written: {self.written}", f"records skipped: {sum(self.skipped.values())}"]
        for reason, n in self.skipped.most_common():
            lines.append(f"  {n:8d}  {reason}   e.g. {self.examples[reason][0]}")
        lines += [f"output: {p}" for p in self.outputs]
        lines += [f"removed, left by an earlier build of this prefix: {p}" for p in self.removed]
        return "\n".join(lines)


def convert(inputs: Iterable[str], fmt: str, *, source: str, task: str | None = None,
            image_root: str | None = None, max_pixels: int = image_lib.DEFAULT_MAX_PIXELS,
            report: BuildReport | None = None) -> Iterator[R.Record]:
    """Validated records from the input files; rejections are counted in `report`."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
    report = report if report is not None else BuildReport()
    task = task or DEFAULT_TASK[fmt]
    images = ImageFolder(image_root, max_pixels)
    for path in inputs:
        for where, entry in read_entries(path, fmt):
            try:
                if isinstance(entry, Reject):
                    raise entry
                yield make_record(entry, fmt, where=where, source=source, task=task, images=images)
            except Reject as e:
                report.reject(where, e)


def build(inputs: Iterable[str], fmt: str, output: str, *, source: str, task: str | None = None,
          image_root: str | None = None, num_shards: int = 1, tfds_name: str | None = None,
          max_pixels: int = image_lib.DEFAULT_MAX_PIXELS) -> BuildReport:
    """Convert, validate and write `<output>-0000i-of-0000n.array_record` (or a TFDS dataset)."""
    report, inputs = BuildReport(), list(inputs)
    recs = convert(inputs, fmt, source=source, task=task, image_root=image_root, max_pixels=max_pixels,
                   report=report)
    if tfds_name:
        data = [R.serialize(r) for r in recs]
        report.outputs = [R.write_tfds(output, tfds_name, data)]
        report.written = len(data)
    else:
        args = {"tool": "dsvl-data", "format": fmt, "inputs": inputs, "source": source,
                "task": task or DEFAULT_TASK[fmt], "image_root": image_root, "num_shards": num_shards,
                "max_pixels": max_pixels}
        with R.ShardWriter(output, num_shards, build=args) as w:
            for rec in recs:
                w.write(R.serialize(rec))
        report.written, report.outputs, report.removed = w.count, w.paths, w.removed
    return report


def corpus_texts(paths: Iterable[str]) -> Iterator[str]:
    """Every text segment of the records in the given shards (for tokenizer training)."""
    for path in paths:
        src = R.array_record_source(path)
        for i in range(len(src)):
            for seg in R.deserialize(src[i]).segments:
                if not seg.is_image and seg.text.strip():
                    yield seg.text


def check_main(argv: list[str]) -> int:
    """`dsvl-data check PATHS...`: resolve shards as the loader does and count their records."""
    p = argparse.ArgumentParser(prog="dsvl-data check", description=check_main.__doc__)
    p.add_argument("paths", nargs="+", help="shard files, a glob or a directory (as a source's paths=)")
    args = p.parse_args(argv)
    logging.basicConfig(format="dsvl-data: warning: %(message)s")
    try:
        files = R.expand_paths(args.paths)
        counts = [S.count_records(f) for f in files]
    except (R.ManifestError, FileNotFoundError) as e:  # a broken set: one line naming the file
        print(f"dsvl-data: error: {e}", file=sys.stderr)
        return 2
    for f, n in zip(files, counts):
        print(f"{n:10d}  {f}")
    print(f"{sum(counts):10d}  records in {len(files)} shard(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        return check_main(argv[1:])
    p = argparse.ArgumentParser(prog="dsvl-data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--input", required=True, action="append", help="input file (repeatable)")
    p.add_argument("--output", required=True,
                   help="shard prefix (ArrayRecord) or, with --tfds-name, the TFDS data_dir")
    p.add_argument("--source", default=None, help="source name stored in each record (default: output basename)")
    p.add_argument("--task", default=None, help="task tag (default: sft/caption/interleaved/text by format)")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to (never left)")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--tfds-name", default=None, help="write a TFDS dataset of this name instead of bare shards")
    p.add_argument("--max-pixels", type=int, default=image_lib.DEFAULT_MAX_PIXELS)
    p.add_argument("--spm-model", default=None, help="also train a sentencepiece model on the corpus text")
    p.add_argument("--spm-vocab-size", type=int, default=8000)
    args = p.parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            p.error(f"--input {path}: no such file")
    if args.image_root and not os.path.isdir(args.image_root):
        p.error(f"--image-root {args.image_root}: no such directory")
    source = args.source or os.path.basename(args.output.rstrip("/")) or "corpus"
    try:
        report = build(args.input, args.format, args.output, source=source, task=args.task,
                       image_root=args.image_root, num_shards=args.num_shards, tfds_name=args.tfds_name,
                       max_pixels=args.max_pixels)
    except ValueError as e:
        p.error(str(e))
    report_path = args.output.rstrip("/") + ".report.json"
    with open(report_path, "w") as f:
        json.dump(report.to_dict(), f, indent=2, ensure_ascii=False)
    print(report.format())
    print(f"report: {report_path}")
    if args.spm_model:
        if args.tfds_name:
            p.error("--spm-model reads ArrayRecord shards; build without --tfds-name to use it")
        train_sentencepiece(list(corpus_texts(report.outputs)), args.spm_vocab_size, args.spm_model)
        print(f"sentencepiece model: {args.spm_model} (vocab {args.spm_vocab_size})")
    return 0 if report.written else 1


if __name__ == "__main__":
    sys.exit(main())
