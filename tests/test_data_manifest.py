"""Shard manifests: a rebuild into the same prefix replaces the set, and the loader reads exactly the shards
the manifest lists — stray ones skipped with a warning, missing or rewritten ones an error naming them."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from dsvl_jax.data import loader as L
from dsvl_jax.data import records as R
from dsvl_jax.data import shards as S
from dsvl_jax.data.mixture import SourceConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dsvl_data(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "dsvl_jax.data.build_cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def loaded_ids(paths) -> list[str]:
    """Record ids through the loader's own source resolution (`open_source`)."""
    src = L.open_source(SourceConfig("s", paths=paths))
    return [R.deserialize(src[i]).record_id for i in range(len(src))]


def texts(prefix: str, n: int, num_shards: int) -> list[str]:
    return R.write_records(prefix, [R.Record(f"r{i}", "s", "text", (R.text(f"doc {i}"),)) for i in range(n)],
                           num_shards)


def test_rebuild_with_another_shard_count_replaces_the_set(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"doc {i}"}) + "\n"
                                                 for i in range(9)))
    out = tmp_path / "out" / "text"
    build = ["--format", "text", "--input", str(tmp_path / "docs.jsonl"), "--output", str(out)]
    first = dsvl_data(*build, "--num-shards", "3")
    assert first.returncode == 0, first.stderr
    old = sorted(os.listdir(tmp_path / "out"))
    second = dsvl_data(*build, "--num-shards", "2")
    assert second.returncode == 0, second.stderr
    removed = [line for line in second.stdout.splitlines() if line.startswith("removed, left by an earlier build")]
    assert [line.rsplit(" ", 1)[1] for line in removed] == [str(tmp_path / "out" / f) for f in old
                                                            if f.endswith("-of-00003.array_record")]
    assert sorted(os.listdir(tmp_path / "out")) == ["text-00000-of-00002.array_record",
                                                    "text-00001-of-00002.array_record",
                                                    "text.manifest.json", "text.report.json"]
    manifest = json.loads((tmp_path / "out" / "text.manifest.json").read_text())
    assert (manifest["version"], manifest["num_records"], manifest["build"]["num_shards"]) == (1, 9, 2)
    assert [(s["file"], s["records"]) for s in manifest["shards"]] == [("text-00000-of-00002.array_record", 5),
                                                                       ("text-00001-of-00002.array_record", 4)]
    want = sorted(f"d{i}" for i in range(9))
    for spec in (str(out) + "-*", str(tmp_path / "out")):  # a glob and the directory: each record once
        assert sorted(loaded_ids(spec)) == want


def test_stray_shard_is_skipped_with_one_warning(tmp_path, caplog):
    paths = texts(str(tmp_path / "t"), 4, 2)
    stray = str(tmp_path / "t-00000-of-00005.array_record")  # as left by an older build
    shutil.copy(paths[0], stray)
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        ids = loaded_ids(str(tmp_path / "t-*"))
    assert sorted(ids) == ["r0", "r1", "r2", "r3"]
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert stray in warning.getMessage() and "t.manifest.json" in warning.getMessage()
    assert paths[0] not in warning.getMessage()


def test_missing_shard_is_one_line_naming_it(tmp_path):
    paths = texts(str(tmp_path / "t"), 6, 3)
    ok = dsvl_data("check", str(tmp_path / "t-*"))
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1].split() == ["6", "records", "in", "3", "shard(s)"]
    os.remove(paths[1])
    proc = dsvl_data("check", str(tmp_path / "t-*"))
    assert proc.returncode == 2, proc
    assert proc.stderr.count("\n") == 1 and paths[1] in proc.stderr and "t.manifest.json" in proc.stderr
    assert "Traceback (most recent call last)" not in proc.stderr
    with pytest.raises(S.ManifestError, match=paths[1]):  # the training loader stops the same way
        loaded_ids(str(tmp_path))
    for p in paths:  # all gone: the manifest still explains why nothing matches
        if os.path.exists(p):
            os.remove(p)
    with pytest.raises(S.ManifestError, match="does not exist"):
        loaded_ids(str(tmp_path / "t-*"))


def test_record_count_or_size_differing_from_the_manifest_is_an_error(tmp_path):
    paths = texts(str(tmp_path / "t"), 5, 2)
    manifest = tmp_path / "t.manifest.json"
    doc = json.loads(manifest.read_text())
    doc["shards"][1]["records"] += 1
    manifest.write_text(json.dumps(doc))
    with pytest.raises(S.ManifestError, match=f"{paths[1]} holds 2 records but .* lists 3"):
        loaded_ids(str(tmp_path / "t-*"))
    doc["shards"][1]["records"] -= 1
    doc["shards"][0]["bytes"] += 1
    manifest.write_text(json.dumps(doc))
    with pytest.raises(S.ManifestError, match=f"{paths[0]} is .* bytes"):
        loaded_ids(paths)


@pytest.mark.parametrize("entry", [{"file": "../u-00000-of-00001.array_record", "records": 1, "bytes": 1},
                                   {"file": "t-00000-of-00001.array_record", "records": -1, "bytes": 1},
                                   {"file": "notes.txt", "records": 1, "bytes": 1}])
def test_manifest_cannot_point_outside_its_set(tmp_path, entry):
    texts(str(tmp_path / "t"), 2, 1)
    doc = json.loads((tmp_path / "t.manifest.json").read_text())
    doc["shards"].append(entry)
    (tmp_path / "t.manifest.json").write_text(json.dumps(doc))
    with pytest.raises(S.ManifestError, match="shard entry 1"):
        loaded_ids(str(tmp_path / "t-*"))


def test_failed_or_interrupted_build_keeps_the_old_set_readable(tmp_path, monkeypatch, caplog):
    prefix = str(tmp_path / "t")
    texts(prefix, 3, 1)
    with pytest.raises(RuntimeError):  # an exception mid-build: the new files are discarded
        with R.ShardWriter(prefix, 2) as w:
            w.write(b"new")
            raise RuntimeError("input broke")
    assert sorted(os.listdir(tmp_path)) == ["t-00000-of-00001.array_record", "t.manifest.json"]
    real_replace = os.replace

    def crash_at_manifest(src, dst):  # killed after the shards were renamed, before the manifest
        if dst.endswith(S.MANIFEST_SUFFIX):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(S.os, "replace", crash_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        R.write_records(prefix, [R.Record("new", "s", "text", (R.text("x"),))] * 4, num_shards=2)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        assert sorted(loaded_ids(prefix + "-*")) == ["r0", "r1", "r2"]  # the old manifest's set, whole
    assert "t-00001-of-00002.array_record" in caplog.text
    for name in (".t-00000-of-00003.array_record.1.tmp", ".u-00000-of-00001.array_record.1.tmp"):
        (tmp_path / name).write_bytes(b"x")  # killed mid-write by process 1: this prefix's and another's
    texts(prefix, 4, 2)  # the next build clears up after this prefix's crashed builds
    assert sorted(os.listdir(tmp_path)) == [".u-00000-of-00001.array_record.1.tmp",
                                            "t-00000-of-00002.array_record", "t-00001-of-00002.array_record",
                                            "t.manifest.json"]


def test_broken_manifest_matters_only_to_reads_it_concerns(tmp_path):
    texts(str(tmp_path / "t"), 2, 1)
    (tmp_path / "u.manifest.json").write_text("{not json")
    assert sorted(loaded_ids(str(tmp_path / "t-*"))) == ["r0", "r1"]  # another prefix's manifest
    with pytest.raises(S.ManifestError, match="u.manifest.json: unreadable"):  # the directory is the set
        loaded_ids(str(tmp_path))
