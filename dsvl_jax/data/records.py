"""One record format for text documents, image-text documents and conversations.

A record is an ordered list of segments — text (with a role for conversations) and image references —
plus the images themselves as encoded bytes (PNG/JPEG/... as found), a task tag, a source name and a
record id. Serialised without pickle so that a corrupt or hostile shard can only ever fail to parse:

    b"DSVLREC1" | u32 little-endian header length | UTF-8 JSON header | image blob 0 | image blob 1 | ...

    header = {"id": str, "source": str, "task": str,
              "segments": [{"text": str, "role": "system"|"user"|"assistant"|null} | {"image": k}, ...],
              "image_bytes": [len(blob 0), len(blob 1), ...]}

Image segments reference the blobs in order (k = 0, 1, 2, ...), each exactly once: the order of the
placeholders in the text is the order of the images. Either every text segment has a role (a
conversation, supervised on the assistant turns) or none has (a document, supervised on all text).

Shards are ArrayRecord files with a manifest beside them (`shards`); they read back through
`grain.sources.ArrayRecordDataSource` or a tfds dataset (`tfds_source`) that stores the same bytes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import struct
from typing import Iterable, Sequence

# Shard files and their manifest live in `shards` (no record knowledge needed there); re-exported here.
from .shards import ManifestError, ShardWriter, expand_paths, shard_paths  # noqa: F401

MAGIC = b"DSVLREC1"
_LEN = struct.Struct("<I")
ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A record that cannot be used; `reason` is a short, countable category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Segment:
    text: str | None = None
    role: str | None = None
    image: int | None = None  # index into Record.images

    @property
    def is_image(self) -> bool:
        return self.image is not None


@dataclasses.dataclass(frozen=True)
class Record:
    record_id: str
    source: str
    task: str
    segments: tuple[Segment, ...]
    images: tuple[bytes, ...] = ()

    @property
    def is_conversation(self) -> bool:
        return any(s.role is not None for s in self.segments if not s.is_image)

    @property
    def num_images(self) -> int:
        return len(self.images)


def text(t: str, role: str | None = None) -> Segment:
    return Segment(text=t, role=role)


def image(k: int) -> Segment:
    return Segment(image=k)


# ---------------------------------------------------------------------------------------------
# Validation (shared by the writer and the reader, so the build tool and the loader agree)
# ---------------------------------------------------------------------------------------------
def _check_utf8(s: str, what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from "\ud800" escapes or surrogateescape'd bytes
        raise RecordError("non-UTF-8 text", f"{what}: {e.reason} at {e.start}") from None


def validate(rec: Record) -> None:
    """Raise RecordError when `rec` breaks the format's rules (see the module docstring)."""
    for name in ("record_id", "source", "task"):
        value = getattr(rec, name)
        if not isinstance(value, str) or not value:
            raise RecordError("malformed header", f"{name} must be a non-empty string, got {value!r}")
        _check_utf8(value, name)
    if not rec.segments:
        raise RecordError("empty record", "no segments")
    next_image, roles = 0, set()
    for i, seg in enumerate(rec.segments):
        if seg.is_image:
            if seg.text is not None or seg.role is not None:
                raise RecordError("malformed header", f"segment {i} is both an image and text")
            if seg.image != next_image:
                raise RecordError("image count mismatch",
                                  f"segment {i} references image {seg.image}, expected image {next_image} "
                                  f"(images must be referenced once each, in order)")
            next_image += 1
        else:
            if not isinstance(seg.text, str):
                raise RecordError("malformed header", f"segment {i} has neither text nor an image")
            _check_utf8(seg.text, f"segment {i}")
            if seg.role is not None and seg.role not in ROLES:
                raise RecordError("malformed header", f"segment {i} has role {seg.role!r}; expected one of {ROLES}")
            roles.add(seg.role)
    if next_image != len(rec.images):
        raise RecordError("image count mismatch",
                          f"{next_image} image placeholder(s) for {len(rec.images)} image(s)")
    if None in roles and len(roles) > 1:
        raise RecordError("malformed header", "some text segments have a role and some do not")
    texts = [s for s in rec.segments if not s.is_image]
    if not any(s.text.strip() for s in texts):
        raise RecordError("empty text", "no non-blank text segment")
    if rec.is_conversation and not any(s.role == "assistant" and s.text.strip() for s in texts):
        raise RecordError("empty text", "conversation without a non-blank assistant turn")
    for k, blob in enumerate(rec.images):
        if not isinstance(blob, (bytes, bytearray)) or not blob:
            raise RecordError("empty image bytes", f"image {k} is zero bytes")


# ---------------------------------------------------------------------------------------------
# (De)serialisation
# ---------------------------------------------------------------------------------------------
def serialize(rec: Record, *, check: bool = True) -> bytes:
    """Record -> bytes. `check=False` writes a record as-is (tests use it to plant bad records)."""
    if check:
        validate(rec)
    segments = []
    for seg in rec.segments:
        segments.append({"image": seg.image} if seg.is_image else {"text": seg.text, "role": seg.role})
    header = {"id": rec.record_id, "source": rec.source, "task": rec.task, "segments": segments,
              "image_bytes": [len(b) for b in rec.images]}
    blob = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return b"".join([MAGIC, _LEN.pack(len(blob)), blob, *rec.images])


def _field(header: dict, key: str, kind, what: str):
    value = header.get(key)
    if not isinstance(value, kind):
        raise RecordError("malformed header", f"{what} {key!r} is {type(value).__name__}, expected {kind}")
    return value


def deserialize(data: bytes) -> Record:
    """bytes -> validated Record, or RecordError with a countable reason."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError("not a record", f"got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC) + _LEN.size:
        raise RecordError("truncated record", f"{len(data)} bytes")
    if not data.startswith(MAGIC):
        raise RecordError("not a record", f"bad magic {data[:8]!r}")
    (hlen,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if start + hlen > len(data):
        raise RecordError("truncated record", f"header of {hlen} bytes, record of {len(data)}")
    try:
        header = json.loads(data[start:start + hlen].decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecordError("non-UTF-8 text", str(e)) from None
    except json.JSONDecodeError as e:
        raise RecordError("malformed header", str(e)) from None
    except RecursionError:  # e.g. "[[[[…" a hundred thousand deep
        raise RecordError("malformed header", "JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise RecordError("malformed header", f"header is {type(header).__name__}")
    sizes = _field(header, "image_bytes", list, "header")
    if not all(isinstance(n, int) and n >= 0 for n in sizes):
        raise RecordError("malformed header", f"image_bytes={sizes!r}")
    offset = start + hlen
    if offset + sum(sizes) != len(data):
        raise RecordError("truncated record",
                          f"{len(data) - offset} image bytes present, header declares {sum(sizes)}")
    images = []
    for n in sizes:
        images.append(data[offset:offset + n])
        offset += n
    segments = []
    for i, s in enumerate(_field(header, "segments", list, "header")):
        if not isinstance(s, dict):
            raise RecordError("malformed header", f"segment {i} is {type(s).__name__}")
        if "image" in s:
            if not isinstance(s["image"], int) or isinstance(s["image"], bool):
                raise RecordError("malformed header", f"segment {i} image index {s['image']!r}")
            segments.append(Segment(image=s["image"]))
        else:
            role = s.get("role")
            if role is not None and not isinstance(role, str):
                raise RecordError("malformed header", f"segment {i} role {role!r}")
            segments.append(Segment(text=_field(s, "text", str, f"segment {i}"), role=role))
    rec = Record(record_id=_field(header, "id", str, "header"), source=_field(header, "source", str, "header"),
                 task=_field(header, "task", str, "header"), segments=tuple(segments), images=tuple(images))
    validate(rec)
    return rec


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------
def write_records(prefix: str, records: Iterable[Record | bytes], num_shards: int = 1,
                  build: dict | None = None) -> list[str]:
    """Write records (Record objects are validated; raw bytes are written as they are) and the set's
    manifest (`shards.ShardWriter`); `build` is stored in the manifest as the build's arguments."""
    with ShardWriter(prefix, num_shards, build) as w:
        for r in records:
            w.write(r if isinstance(r, (bytes, bytearray)) else serialize(r))
    return w.paths


def array_record_source(paths: str | Sequence[str]):
    """Random-access source of serialised records (bytes) over ArrayRecord shards."""
    import grain

    return grain.sources.ArrayRecordDataSource(expand_paths(paths))


# ---------------------------------------------------------------------------------------------
# tfds: the same bytes as a TFDS dataset (array_record file format, no TensorFlow needed)
# ---------------------------------------------------------------------------------------------
TFDS_FEATURE = "record"


def write_tfds(data_dir: str, name: str, records: Iterable[Record | bytes]) -> str:
    """Prepare a TFDS dataset `name` holding the serialised records; returns its directory.

    Read it back with `tfds_source(dir)` or `tfds.data_source(name, data_dir=data_dir)`.
    """
    builder = _builder_class(name)(records=records, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


@functools.cache
def _builder_class(name: str):
    import numpy as np
    import tensorflow_datasets as tfds

    # tfds takes the dataset name from the class name. Registration is skipped (for the helper base
    # class too): readers open the prepared directory, so no class needs to exist in their process.
    with tfds.core.registered.skip_registration():
        class Builder(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            # Nothing is downloaded; without this, tfds looks for a checksums file next to the module
            # and needs the optional `importlib_resources` to do so.
            url_infos = None

            def __init__(self, *, records: Iterable[Record | bytes] = (), **kw):
                self._records = records
                super().__init__(**kw)

            def _info(self):
                # Scalar object feature = raw bytes; an Image feature would need TensorFlow to encode.
                features = tfds.features.FeaturesDict({TFDS_FEATURE: tfds.features.Scalar(np.object_)})
                return tfds.core.DatasetInfo(builder=self, features=features)

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i, r in enumerate(self._records):
                    yield i, {TFDS_FEATURE: r if isinstance(r, (bytes, bytearray)) else serialize(r)}

        return type(_to_camel(name), (Builder,), {"__module__": __name__})


def _to_camel(name: str) -> str:
    parts = [p for p in "".join(c if c.isalnum() else "_" for c in name).split("_") if p]
    if not parts or not parts[0][0].isalpha():
        raise ValueError(f"tfds dataset name {name!r} must start with a letter")
    return "".join(p[:1].upper() + p[1:] for p in parts)


# The only feature classes a record dataset names (what `write_tfds` writes).
TFDS_FEATURE_CLASSES = ("tensorflow_datasets.core.features.features_dict.FeaturesDict",
                        "tensorflow_datasets.core.features.scalar.Scalar")
_CLASS_KEYS = ("pythonClassName", "python_class_name", "type", "protoCls", "proto_cls")


def check_tfds_features(dataset_dir: str) -> None:
    """Refuse a TFDS directory whose metadata names any other feature class: tfds imports the module
    of every class named there, so a hostile dataset could run code (a module beside it on sys.path)."""
    from etils import epath

    def names(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in _CLASS_KEYS and isinstance(v, str):
                    yield v
                yield from names(v)
        elif isinstance(node, list):
            for v in node:
                yield from names(v)

    for meta in ("features.json", "dataset_info.json"):
        path = epath.Path(dataset_dir) / meta
        if not path.exists():
            continue
        try:
            tree = json.loads(path.read_text())
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: unreadable TFDS metadata ({e})") from None
        if meta == "dataset_info.json":
            tree = tree.get("features", {}) if isinstance(tree, dict) else tree
        bad = sorted(set(names(tree)) - set(TFDS_FEATURE_CLASSES))
        if bad:
            raise ValueError(f"{path}: names feature classes {bad}; a record dataset has only "
                             f"{list(TFDS_FEATURE_CLASSES)} (refused: tfds would import their modules)")


class TfdsRecordSource:
    """Random-access source of serialised records read from a prepared TFDS directory."""

    def __init__(self, dataset_dir: str, split: str = "train"):
        self.dataset_dir, self.split = dataset_dir, split
        self._src = None

    def _source(self):
        if self._src is None:
            import tensorflow_datasets as tfds

            check_tfds_features(self.dataset_dir)
            self._src = tfds.builder_from_directory(self.dataset_dir).as_data_source(split=self.split)
        return self._src

    def __len__(self) -> int:
        return len(self._source())

    def __getitem__(self, i: int) -> bytes:
        return self._source()[i][TFDS_FEATURE]

    def __getstate__(self):  # workers reopen the files themselves
        return {"dataset_dir": self.dataset_dir, "split": self.split, "_src": None}

    def __repr__(self) -> str:
        return f"TfdsRecordSource({self.dataset_dir!r}, split={self.split!r})"


def tfds_source(dataset_dir: str, split: str = "train") -> TfdsRecordSource:
    return TfdsRecordSource(dataset_dir, split)
