"""Shard sets on disk: `<prefix>-0000i-of-0000n.array_record` files and the manifest naming them.

Every write goes through `ShardWriter`, which leaves `<prefix>.manifest.json` beside the shards:

    {"format": "dsvl-shards", "version": 1, "prefix": "<basename of prefix>", "num_shards": n,
     "num_records": N, "shards": [{"file": "<basename>-00000-of-0000n.array_record", "records": k,
     "bytes": b}, ...], "build": {the build's arguments}}

File names are bare names in the manifest's own directory, so a set can be moved or copied whole and
a manifest can never point the reader outside its directory.

Order of a write, so that a crash at any point leaves a manifest that describes files on disk:
shards are written under hidden temporary names (no glob of the prefix sees them), renamed into
place, the manifest is replaced, and only then are the shards of the same prefix that it does not list
(an earlier build with another shard count) removed. A crash before the manifest is replaced leaves
the old manifest, which the reader holds the new files against: unlisted ones are skipped with a
warning, a rewritten one fails its size or record count.

Reading (`expand_paths`): files, a glob or a directory resolve to shard files; each manifest beside
them that concerns them is applied: a shard it lists must exist with its listed size and record
count (else an error naming the file), and a shard of its prefix that it does not list is not read
(one warning naming the files). Shards without a manifest (hand-written sets) are read as found.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import re
from typing import Sequence

MANIFEST_SUFFIX = ".manifest.json"
FORMAT, VERSION = "dsvl-shards", 1
_SHARD = re.compile(r"^(?P<prefix>.*)-\d{5,}-of-\d{5,}\.array_record$")
_TEMP = re.compile(r"^\.(?P<name>.+)\.\d+\.tmp$")  # `_temp`'s names
log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A manifest that cannot be read, or shards that do not match it."""


def shard_paths(prefix: str, num_shards: int) -> list[str]:
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


def manifest_path(prefix: str) -> str:
    return prefix + MANIFEST_SUFFIX


def _temp(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{os.getpid()}.tmp")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def count_records(path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


class ShardWriter:
    """Writes serialised records round-robin over `num_shards` ArrayRecord files, then the manifest.

    Used as a context manager: a clean exit commits (rename, manifest, stale shards removed; see the
    module docstring), an exception discards the new files and leaves the old set as it was.
    """

    def __init__(self, prefix: str, num_shards: int = 1, build: dict | None = None):
        from array_record.python.array_record_module import ArrayRecordWriter

        if num_shards < 1:
            raise ValueError(f"num_shards={num_shards} must be >= 1")
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix, self.build = prefix, dict(build or {})
        self.paths = shard_paths(prefix, num_shards)
        self.manifest = manifest_path(prefix)
        self.removed: list[str] = []
        self.count, self.counts = 0, [0] * num_shards
        self._temps = [_temp(p) for p in self.paths]
        # group_size:1 keeps random access cheap: reading one record decompresses one record.
        self._writers = [ArrayRecordWriter(t, "group_size:1") for t in self._temps]
        self._open = True

    def write(self, data: bytes) -> None:
        k = self.count % len(self._writers)
        self._writers[k].write(data)
        self.counts[k] += 1
        self.count += 1

    def _close_writers(self) -> None:
        if self._open:
            self._open = False
            for w in self._writers:
                w.close()

    def close(self) -> None:
        """Commit: shards into place, the manifest, then stale shards of the prefix removed."""
        if not self._open:
            return
        self._close_writers()
        for tmp, path in zip(self._temps, self.paths):
            _fsync(tmp)
            os.replace(tmp, path)
        shards = [{"file": os.path.basename(p), "records": n, "bytes": os.path.getsize(p)}
                  for p, n in zip(self.paths, self.counts)]
        doc = {"format": FORMAT, "version": VERSION, "prefix": os.path.basename(self.prefix),
               "num_shards": len(self.paths), "num_records": self.count, "shards": shards, "build": self.build}
        tmp = _temp(self.manifest)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.manifest)
        try:
            _fsync(os.path.dirname(os.path.abspath(self.manifest)))  # the renames, before old shards go
        except OSError:  # some file systems (FUSE mounts) cannot sync a directory
            pass
        self.removed = remove_stale(self.prefix, keep=self.paths)

    def abort(self) -> None:
        """Discard what was written; the files of an earlier build stay as they were."""
        self._close_writers()
        for tmp in self._temps:
            if os.path.exists(tmp):
                os.remove(tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _stale(name: str, base: str, keep: set[str]) -> bool:
    t = _TEMP.match(name)  # a temporary file of a build of this prefix that crashed
    if t:
        return t["name"] == base + MANIFEST_SUFFIX or _stale(t["name"], base, set())
    m = _SHARD.match(name)
    return bool(m) and m["prefix"] == base and name not in keep


def remove_stale(prefix: str, keep: Sequence[str]) -> list[str]:
    """Delete shards named like `<prefix>-i-of-n` that are not in `keep`, and temporary files that crashed
    builds of the prefix left; returns their paths."""
    directory, base = os.path.split(os.path.abspath(prefix))
    keep_names = {os.path.basename(p) for p in keep}
    removed = []
    for name in sorted(os.listdir(directory)):
        if _stale(name, base, keep_names):
            path = os.path.join(os.path.dirname(prefix), name)
            os.remove(path)
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_manifest(path: str) -> dict:
    """The manifest at `path`, checked; ManifestError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ManifestError(f"{path}: unreadable shard manifest ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a shard manifest (expected \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise ManifestError(f"{path}: shard manifest version {doc.get('version')!r}, this reader knows {VERSION}")
    shards = doc.get("shards")
    if not isinstance(shards, list):
        raise ManifestError(f"{path}: \"shards\" is not a list")
    for i, s in enumerate(shards):
        ok = (isinstance(s, dict) and isinstance(s.get("file"), str) and _SHARD.match(s["file"])
              and os.path.basename(s["file"]) == s["file"]
              and all(isinstance(s.get(k), int) and not isinstance(s[k], bool) and s[k] >= 0
                      for k in ("records", "bytes")))
        if not ok:
            raise ManifestError(f"{path}: shard entry {i} is not {{\"file\": a shard name in this directory, "
                                f"\"records\": int, \"bytes\": int}}: {str(s)[:200]}")
    return doc


def _has_magic(p: str) -> bool:
    return any(c in p for c in "*?[")


def _check_shard(path: str, entry: dict, manifest: str) -> None:
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise ManifestError(f"shard {path} is {size} bytes but its manifest {manifest} lists {entry['bytes']} "
                            f"(rewritten after the manifest; rebuild the set)")
    n = count_records(path)
    if n != entry["records"]:
        raise ManifestError(f"shard {path} holds {n} records but its manifest {manifest} lists "
                            f"{entry['records']} (rebuild the set)")


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """A glob, a directory (all *.array_record inside) or a list of files -> shard files, checked against
    the manifests beside them (module docstring). FileNotFoundError / ManifestError name the file."""
    items = [paths] if isinstance(paths, str) else list(paths)
    found: list[str] = []
    dirs: set[str] = set()
    for p in items:
        if os.path.isdir(p):
            found.extend(sorted(glob.glob(os.path.join(glob.escape(p), "*.array_record"))))
            dirs.add(p)
        elif _has_magic(p):
            # a manifest is a sidecar, never a shard, whatever the glob says
            found.extend(sorted(f for f in glob.glob(p) if not f.endswith(MANIFEST_SUFFIX)))
            parent = os.path.dirname(p) or "."
            dirs.update(d for d in glob.glob(parent) if os.path.isdir(d))
        else:
            found.append(p)
            dirs.add(os.path.dirname(p) or ".")
    dirs.update(os.path.dirname(f) or "." for f in found)
    spec = [os.path.abspath(p) for p in items]
    skip: set[str] = set()
    for d in sorted({os.path.abspath(d) for d in dirs}):
        for mpath in sorted(glob.glob(os.path.join(glob.escape(d), "*" + MANIFEST_SUFFIX))):
            skip |= _apply_manifest(mpath, d, spec, found)
    missing = [p for p in found if not os.path.exists(p)]
    out = [f for f in found if os.path.abspath(f) not in skip]
    if not out or missing:
        raise FileNotFoundError(f"no ArrayRecord shards at {paths!r}" + (f" (missing {missing})" if missing else ""))
    return out


def _apply_manifest(mpath: str, directory: str, spec: list[str], found: list[str]) -> set[str]:
    """Check the shards of `found` (and those `spec` asks for) against one manifest; returns the abs
    paths of shards of its prefix that it does not list (not to be read)."""
    base = os.path.basename(mpath)[: -len(MANIFEST_SUFFIX)]
    ours = [f for f in found if os.path.dirname(os.path.abspath(f)) == directory and os.path.exists(f)
            and (m := _SHARD.match(os.path.basename(f))) and m["prefix"] == base]
    peek = None
    if not ours:  # the manifest may still concern the spec when every shard it lists is gone
        try:
            peek = read_manifest(mpath)
        except ManifestError:
            if directory in spec:  # the directory is the data set: its manifests must be sound
                raise
            return set()  # a broken manifest of a prefix nobody reads here is not this read's business
        listed = [os.path.join(directory, s["file"]) for s in peek["shards"]]
        if not any(s == directory or s == p or fnmatch.fnmatchcase(p, s) for s in spec for p in listed):
            return set()
    doc = peek or read_manifest(mpath)
    entries = {os.path.join(directory, s["file"]): s for s in doc["shards"]}
    gone = [p for p in entries if not os.path.exists(p)]
    if gone:
        more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
        raise ManifestError(f"shard {gone[0]} is listed in {mpath} but does not exist{more}")
    stray = []
    for f in ours:
        entry = entries.get(os.path.abspath(f))
        if entry is None:
            stray.append(os.path.abspath(f))
        else:
            _check_shard(f, entry, mpath)
    if stray:
        log.warning("not reading %d shard(s) that %s does not list (left by another build?): %s",
                    len(stray), mpath, ", ".join(sorted(stray)))
    return set(stray)
