"""Crash safety: the trainer CLI is killed with SIGKILL at seeded random points (during start-up and
restore, mid-step, mid-checkpoint-save) and restarted each time until the run is done: 3 kills in 8 steps
(one of each kind) in `make test`, the 10-kill, 16-step soak in `make test-heavy`. Then:

- the final training state (params, optimizer state, counters) and the data iterator state are
  bit-identical to those of an uninterrupted run;
- every restart resumed from the newest checkpoint Orbax had finished at the moment of the kill: a
  half-written one (still under its `*.orbax-checkpoint-tmp` name) is never chosen;
- the record-id log (`records.0.log`, tests/helpers/record_log.py): steps re-done after a resume list
  exactly the same records; deduplicated by step, the records match the uninterrupted run's step by
  step, none is repeated and none is lost.

Kill points are drawn from a seeded generator relative to what the run has done (the n-th step or
save after the restart), so their kinds are reproducible; the exact instants depend on timing, and
each kill is classified by what was on disk when it landed. Costs kills + 2 process start-ups (each
a few seconds of imports and tracing; compiled programs come from the shared compilation cache).
"""
from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.train_fixtures import subprocess_env, checkpoint_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (steps, planned kills by kind, least kills that must land in each phase); "full" is the 10-kill soak.
SOAKS = {
    "short": (8, ["save", "step", "startup"], {"mid-save": 1, "mid-step": 1, "startup/restore": 1}),
    "full": (16, ["save"] * 3 + ["step"] * 3 + ["startup"] + ["any"] * 3,
             {"mid-save": 2, "mid-step": 2, "startup/restore": 1}),
}
SEED = 1234
LAUNCH_TIMEOUT_S = 600
TMP = ".orbax-checkpoint-tmp"

# The CLI cannot override a list-valued key such as data.sources, so the corpus goes in through a
# config file of its own (as a user would write one), on top of configs/tiny.py:stage2.
CONFIG_FILE = '''
import importlib.util, json, os
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("tiny_base", {tiny!r})
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config(arg="stage2"):
    c = _tiny.get_config(arg)
    with open(os.path.join(_here, "corpus.json")) as f:
        corpus = json.load(f)
    c.data.sources, c.data.tokenizer = corpus["sources"], corpus["tokenizer"]
    return c
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("crash")
    sources, tokenizer = corpus
    (root / "corpus.json").write_text(json.dumps({"sources": sources, "tokenizer": tokenizer}))
    cfg_file = root / "crash_config.py"
    cfg_file.write_text(CONFIG_FILE.format(tiny=os.path.join(REPO, "configs", "tiny.py")))
    return root, str(cfg_file), sources, tokenizer




def _launch(cfg_file: str, workdir: str, log_path: str, total: int) -> subprocess.Popen:
    # the trainer CLI, plus the record-id log (tests/helpers/record_log.py)
    cmd = [sys.executable, "-m", "tests.helpers.record_log", f"--config={cfg_file}:stage2", f"--workdir={workdir}",
           f"--config.total_steps={total}", "--config.checkpoint.every=1", "--config.log_every=1"]
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)


def _checkpoints(workdir: str, since: float = 0.0) -> tuple[list[int], list[int]]:
    """(finished steps, steps being written) as the directory names say; a temporary folder counts only
    if created at or after `since` (a killed save leaves one behind until that step is saved again)."""
    folder = os.path.join(workdir, "checkpoints")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return [], []
    done = sorted(int(n) for n in names if n.isdigit())
    partial = []
    for n in names:
        if TMP in n and n.split(".")[0].isdigit():
            try:
                if os.stat(os.path.join(folder, n)).st_ctime >= since:
                    partial.append(int(n.split(".")[0]))
            except FileNotFoundError:  # renamed or removed meanwhile
                pass
    return done, sorted(partial)


def _record_lines(workdir: str) -> list[dict]:
    try:
        with open(os.path.join(workdir, "records.0.log")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _tail(path: str, n: int = 3000) -> str:
    with open(path, "rb") as f:
        return f.read()[-n:].decode(errors="replace")


def _wait_exit(proc: subprocess.Popen, log_path: str):
    try:
        rc = proc.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the trainer did not finish in {LAUNCH_TIMEOUT_S} s:\n{_tail(log_path)}")
    assert rc == 0, f"the trainer exited with {rc}:\n{_tail(log_path)}"


def _kill_when(proc, workdir, log_path, trigger, delay_s: float, lines_before: int, since: float) -> None:
    """Poll until `trigger(this run's record lines, finished, being written)` holds, wait `delay_s`, SIGKILL."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not trigger(_record_lines(workdir)[lines_before:], *_checkpoints(workdir, since)):
        if proc.poll() is not None:
            pytest.fail(f"the trainer exited ({proc.returncode}) before its kill point:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"kill point not reached in {LAUNCH_TIMEOUT_S} s:\n{_tail(log_path)}")
        time.sleep(0.002)
    time.sleep(delay_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _plan(rng: random.Random, planned: list[str]) -> list[str]:
    kinds = [rng.choice(["save", "step", "time"]) if k == "any" else k for k in planned]
    rng.shuffle(kinds)
    return kinds


def _kill_point(kind: str, resume: int, rng: random.Random, launched: float, total: int):
    """(trigger, delay) for a kill of `kind` in a run that resumes at step `resume`. `k` counts the steps
    (or saves) of this run; it is kept small enough that the run never finishes before its kill."""
    k = rng.randint(1, max(1, min(3, total - 3 - resume)))
    if kind == "startup":  # imports, tracing, restore: before or around the first step
        at = launched + rng.uniform(0.5, 8.0)
        return (lambda lines, done, part: time.monotonic() >= at), 0.0
    if kind == "step":  # the k-th step of this run is dispatched (its records are logged) and the state
        s = resume + k - 1  # before it is saved: the kill lands in the step, and the run made k - 1 steps
        return (lambda lines, done, part: any(r["step"] == s for r in lines) and (s == 0 or s in done)), \
            rng.uniform(0, 0.05)
    if kind == "save":  # checkpoint resume+k is being written
        return (lambda lines, done, part: resume + k in part), rng.uniform(0, 0.02)
    assert kind == "time"  # anywhere in the next few seconds of training
    return (lambda lines, done, part: any(r["step"] >= resume for r in lines)), rng.uniform(0, 2.0)


def _classify(new_lines: list[dict], done: list[int], part: list[int]) -> str:
    """What the kill interrupted, from what it left on disk (`part`: this run's unfinished saves)."""
    if not new_lines:
        return "startup/restore"
    if any(p not in done for p in part):
        return "mid-save"
    last = new_lines[-1]["step"]  # dispatched; its result is saved as checkpoint last + 1
    return "mid-step" if last + 1 not in done else "between steps"


def _log_since(path: str, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _resumed_at(log_text: str) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in log_text.splitlines() if "resumed from" in line]


def _data_state(workdir: str, step: int) -> dict:
    folder = os.path.join(workdir, "checkpoints", str(step), "data")
    (name,) = [n for n in os.listdir(folder) if n.startswith("process_")]
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("soak", ["short", pytest.param("full", marks=pytest.mark.heavy)])
def test_kill_anywhere_and_resume_is_exact(setup, soak):
    root, cfg_file, sources, tokenizer = setup
    root = root / soak
    root.mkdir()
    total, planned, least = SOAKS[soak]
    ref_dir, ref_log = str(root / "reference"), str(root / "reference.log")
    reference = _launch(cfg_file, ref_dir, ref_log, total)  # runs alongside the killed one
    wd, log_path = str(root / "killed"), str(root / "killed.log")
    rng = random.Random(SEED)
    history = []
    for i, kind in enumerate(_plan(rng, planned)):
        done_before, _ = _checkpoints(wd)
        resume = done_before[-1] if done_before else 0
        if total - resume < 4:
            kind = "startup"  # too close to the end for a kill that needs steps
        lines_before = len(_record_lines(wd))
        log_offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        since = time.time()  # a temporary folder older than this run is a leftover of an earlier kill
        proc = _launch(cfg_file, wd, log_path, total)
        trigger, delay = _kill_point(kind, resume, rng, time.monotonic(), total)
        _kill_when(proc, wd, log_path, trigger, delay, lines_before, since)
        new_lines, (done, part) = _record_lines(wd)[lines_before:], _checkpoints(wd, since)
        history.append(dict(kill=i, planned=kind, phase=_classify(new_lines, done, part), resume=resume,
                            resumed=_resumed_at(_log_since(log_path, log_offset)), finished_after=done,
                            being_written=part))
        # a restart resumes from the newest finished checkpoint, never from a half-written one
        assert history[-1]["resumed"] in (([], [resume]) if done_before else ([],)), history[-1]
    done_before = _checkpoints(wd)[0]
    log_offset = os.path.getsize(log_path)
    _wait_exit(_launch(cfg_file, wd, log_path, total), log_path)
    assert _resumed_at(_log_since(log_path, log_offset)) == done_before[-1:]
    _wait_exit(reference, ref_log)

    phases = collections.Counter(h["phase"] for h in history)
    report = "\n".join(str(h) for h in history)
    assert len(history) == len(planned)
    # every kind of kill really happened (a kill that missed its window is classified by what it hit)
    assert all(phases[p] >= n for p, n in least.items()), report
    assert _checkpoints(wd)[0][-1] == total

    # the final state and the data iterator's state: bit-identical to the uninterrupted run
    a, b = checkpoint_state(ref_dir, total), checkpoint_state(wd, total)
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]
    assert not differ, differ[:5]
    assert _data_state(ref_dir, total) == _data_state(wd, total)

    # the record-id log: re-done steps list the same records; deduplicated, exactly the reference's
    ref_lines, lines = _record_lines(ref_dir), _record_lines(wd)
    assert [r["step"] for r in ref_lines] == list(range(total))
    by_step = collections.defaultdict(list)
    for r in lines:
        by_step[r["step"]].append(r["codes"])
    assert sorted(by_step) == list(range(total))
    for step, seen in by_step.items():
        assert all(c == seen[0] for c in seen), f"step {step} read different records when re-done"
    consumed = [c for s in range(total) for c in by_step[s][0]]
    reference_codes = [c for r in ref_lines for c in r["codes"]]
    assert consumed == reference_codes
    repeated = len(consumed) - len(set(consumed))
    lost = len(set(reference_codes) - set(consumed))
    assert repeated == 0 and lost == 0
    # the codes name real records (the log is a record-id log)
    from dsvl_jax.data import loader as data_loader
    from dsvl_jax.processing.tokenizer import Tokenizer
    from dsvl_jax.train.trainer import data_config
    from dsvl_jax.train.validate import model_config
    from tests.helpers.train_fixtures import tiny_config
    cfg = tiny_config("stage2", sources, tokenizer)
    it = data_loader.make_train_iterator(data_config(cfg), model_config(cfg), Tokenizer.from_file(tokenizer),
                                         batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
    ids = {it.record_key(c) for c in consumed}
    assert all(not rid.startswith("<unreadable") for _, rid in ids)

    # side files the converter reads were never left half-written
    with open(tokenizer, "rb") as f1, open(os.path.join(wd, "tokenizer.json"), "rb") as f2:
        assert f1.read() == f2.read()
    with open(os.path.join(wd, "model_config.json")) as f:
        json.load(f)
    replays = sum(len(v) - 1 for v in by_step.values())
    print(f"\ncrash safety: {len(history)} kills survived {dict(phases)}; {len(consumed)} record slots in "
          f"{total} steps ({len(ids)} distinct records), {replays} step(s) re-done after resumes, "
          f"{repeated} repeated, {lost} lost\n{report}")


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no cleanup code catches a BaseException here)."""


def test_side_files_are_never_left_half_written(tmp_path, monkeypatch):
    """The tokenizer copy and model_config.json are written under a temporary name and renamed: a run killed
    mid-copy leaves no truncated file that a later start would keep (it copies only what is missing)."""
    import shutil
    from dsvl_jax.config import tiny
    from dsvl_jax.convert import orbax_io
    from dsvl_jax.train import trainer
    src, wd = tmp_path / "tok", tmp_path / "wd"
    src.mkdir(), wd.mkdir()
    (src / "tokenizer.json").write_text('{"model": "' + "x" * 10000 + '"}')
    real_copy = shutil.copy2

    def dies_half_way(a, b, **kw):
        with open(a, "rb") as f, open(b, "wb") as g:
            g.write(f.read()[:100])
        raise Killed("mid-copy")

    monkeypatch.setattr(shutil, "copy2", dies_half_way)
    with pytest.raises(Killed):
        trainer._copy_tokenizer(str(src / "tokenizer.json"), str(wd))
    assert not (wd / "tokenizer.json").exists()
    monkeypatch.setattr(shutil, "copy2", real_copy)
    trainer._copy_tokenizer(str(src / "tokenizer.json"), str(wd))  # the next start copies it whole
    assert (wd / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()

    orbax_io.write_model_config(str(wd), tiny())
    good = (wd / "model_config.json").read_text()

    def dump_then_die(obj, f, **kw):
        f.write('{"truncat')
        raise Killed("mid-write")

    monkeypatch.setattr(json, "dump", dump_then_die)
    with pytest.raises(Killed):
        orbax_io.write_model_config(str(wd), tiny())
    assert (wd / "model_config.json").read_text() == good  # the previous file, whole
