"""`dsvl-train` as a newcomer meets it, through the real CLI in a subprocess: --help is useful; a config or
input error is one line on stderr (exit 2), never a traceback; a corpus whose every record is skipped stops
with the fix instead of hanging; SIGTERM and SIGINT stop a run at any point (even one stuck skipping
records); Ctrl-C saves (exit 130) and the resumed run logs each step once; resuming with a shorter schedule
or another model is refused; a normal run logs no "illegal summary name".

Every run is text-only, stage 2 of configs/tiny.py (seq_len 160, batch 8, 8 CPU devices) with
total_steps=1000: one train-step program for the module, compiled once (the compilation cache serves reruns).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.train_fixtures import subprocess_env, long_prompt_records, write_long_prompt_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACEBACK = "Traceback (most recent call last)"
SKIPPED = "nothing supervised within seq_len"
TIMEOUT = 120  # per launch; a launch takes 5-15 s


@pytest.fixture(scope="module")
def data(tmp_path_factory, text_corpus):
    """(sources_json with skips among good records, sources_json where every record is skipped, tokenizer)."""
    root = tmp_path_factory.mktemp("cli_train")
    text, tokenizer = text_corpus
    long = write_long_prompt_source(str(root))
    return json.dumps(text + [dict(long, weight=0.3)]), json.dumps([long]), tokenizer, root




def _args(workdir, sources_json, tokenizer, *extra, config="configs/tiny.py:stage2"):
    return [sys.executable, "-m", "dsvl_jax.train.cli", f"--config={config}", f"--workdir={workdir}",
            f"--config.data.tokenizer={tokenizer}", f"--config.data.sources_json={sources_json}",
            "--config.total_steps=1000", "--config.log_every=1", *extra]


def _run(args) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _start(args, log_dir, name) -> tuple[subprocess.Popen, str, str]:
    out, err = os.path.join(log_dir, f"{name}.out"), os.path.join(log_dir, f"{name}.err")
    with open(out, "w") as o, open(err, "w") as e:
        return subprocess.Popen(args, cwd=REPO, env=subprocess_env(), stdout=o, stderr=e), out, err


def _read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _wait_for(proc, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not what():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never got there (exit {proc.poll()})")
        time.sleep(0.1)


def _one_line(stderr: str) -> str:
    """The CLI's own line: exactly one, and no traceback anywhere."""
    assert TRACEBACK not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("dsvl-train:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _train_steps(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


def _logged_up_to(workdir, step: int) -> bool:
    """Whether a running trainer has logged `step` (a line being written is not read)."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return any(line.endswith("\n") and json.loads(line).get("step", 0) >= step for line in f)
    except FileNotFoundError:
        return False


def _checkpoints(workdir) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def test_help_shows_the_required_flags_an_example_and_the_common_keys():
    r = subprocess.run([sys.executable, "-m", "dsvl_jax.train.cli", "--help"], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "usage: dsvl-train --config FILE.py[:VARIANT] --workdir DIR" in text
    assert re.search(r"\n\s+--config FILE.py\[:VARIANT\]\s+a config file", text)
    assert re.search(r"\n\s+--workdir DIR\s+checkpoints", text)
    assert "example" in text and "dsvl-train --config configs/tiny.py:stage1 --workdir" in text
    for key in ("data.tokenizer", "data.sources_json", "total_steps", "batch_size", "seq_len", "mesh.data",
                "mesh.fsdp", "optimizer.lr", "init.from_checkpoint", "stop_at_step", "data.max_skips_in_a_row"):
        assert re.search(rf"\n  {re.escape(key)}\s", text), key
    assert re.search(r"\n  total_steps\s+1000\s", text)  # the base config's value


@pytest.mark.parametrize("case", ["unknown key", "missing file", "unknown variant", "glob matches nothing"])
def test_config_and_input_errors_are_one_line(data, tmp_path, case):
    mixed, _, tokenizer, _ = data
    wd = tmp_path / "wd"
    if case == "unknown key":
        args, expect = _args(wd, mixed, tokenizer, "--config.optimizer.lrr=1"), \
            "config error: --config.optimizer.lrr: unknown config key 'lrr'. Did you mean \"lr\" instead of \"lrr\"?"
    elif case == "missing file":
        args, expect = _args(wd, mixed, tokenizer, config="configs/nope.py"), \
            "config error: --config=configs/nope.py: no such file 'configs/nope.py'"
    elif case == "unknown variant":
        args, expect = _args(wd, mixed, tokenizer, config="configs/tiny.py:stage9"), \
            "config error: --config=configs/tiny.py:stage9: unknown variant 'stage9': stage1, stage2 or stage3"
    else:
        glob = str(tmp_path / "nothing" / "text-*.array_record")
        args, expect = _args(wd, json.dumps([{"name": "text", "paths": glob, "modality": "text"}]), tokenizer), \
            f"config error: config.data.sources: no ArrayRecord shards at '{glob}'"
    r = _run(args)
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_line(r.stderr)
    assert line.startswith(f"dsvl-train: {expect}"), line
    assert not (wd / "checkpoints").exists()


def test_every_record_skipped_stops_with_the_fix_instead_of_hanging(data, tmp_path):
    _, long_only, tokenizer, _ = data
    t0 = time.monotonic()
    r = _run(_args(tmp_path / "wd", long_only, tokenizer))
    took = time.monotonic() - t0
    assert r.returncode == 2 and took <= 60, (r.returncode, took, r.stderr[-3000:])
    line = _one_line(r.stderr)
    # the least row length that takes one of the records: its first supervised target, plus one
    from dsvl_jax.config import tiny
    from dsvl_jax.data.packing import supervised_need
    from dsvl_jax.data.transforms import ExampleMaker
    from dsvl_jax.processing.tokenizer import Tokenizer
    maker = ExampleMaker(Tokenizer.from_file(tokenizer), tiny())
    need = [supervised_need(maker.make(rec), 0)[0] for rec in long_prompt_records()]
    assert min(need) > 160
    assert re.fullmatch(rf"dsvl-train: config error: the text stream skipped 1000 records in a row and made no row "
                        rf"\(1000 × {SKIPPED}; e\.g\. long/long-\d: .*\): raise config\.seq_len \(now 160\) to "
                        rf"≥ {min(need)}.*config\.data\.max_skips_in_a_row=1000\)", line), line


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_run_stuck_skipping_records(data, tmp_path, sig, code):
    _, long_only, tokenizer, _ = data
    proc, _, err = _start(_args(tmp_path / "wd", long_only, tokenizer, "--config.data.max_skips_in_a_row=0"),
                          tmp_path, "stuck")
    _wait_for(proc, lambda: "skipping record long/" in _read(err))  # the first skip: the loop is running
    time.sleep(0.5)
    proc.send_signal(sig)
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{sig.name} did not stop a run stuck in skips within 20 s")
    assert rc == code and time.monotonic() - t0 < 20
    assert _one_line(_read(err)) == f"dsvl-train: stopped by {sig.name} at step 0: nothing trained, nothing saved"


@pytest.fixture(scope="module")
def interrupted(data):
    """A run stopped at step 4 (stop_at_step) whose checkpoint 4 is then lost (as if killed before that save
    finished, after step 4 was logged), resumed from 2 and stopped by Ctrl-C a few steps on."""
    mixed, _, tokenizer, root = data
    wd = str(root / "run")
    first = _run(_args(wd, mixed, tokenizer, "--config.stop_at_step=4", "--config.checkpoint.every=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert _checkpoints(wd) == [2, 4] and _train_steps(wd) == [1, 2, 3, 4]
    shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
    proc, out, err = _start(_args(wd, mixed, tokenizer, "--config.checkpoint.every=1000"), root, "ctrl_c")
    _wait_for(proc, lambda: _logged_up_to(wd, 6))
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=TIMEOUT)
    return wd, first, rc, _read(out), _read(err)


def test_a_normal_run_logs_no_illegal_summary_name(interrupted):
    wd, first, *_ = interrupted
    assert TRACEBACK not in first.stderr and "illegal summary name" not in first.stderr.lower()
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        assert any(f"data/skipped/{SKIPPED}" in row for row in f)  # a name TensorBoard would have refused


def test_ctrl_c_saves_and_the_resumed_run_logs_each_step_once(interrupted):
    wd, _, rc, out, err = interrupted
    assert rc == 130, err[-3000:]
    assert f"resumed from {wd} at step 2" in out
    m = re.fullmatch(rf"dsvl-train: stopped by SIGINT at step (\d+): saved checkpoint (\d+) in {re.escape(wd)}; "
                     r"the same command resumes", _one_line(err))
    assert m and m.group(1) == m.group(2), _one_line(err)
    step = int(m.group(1))
    assert step >= 6 and _checkpoints(wd)[-1] == step
    assert _train_steps(wd) == list(range(1, step + 1))  # steps 3 and 4 were logged twice before


def test_resuming_past_total_steps_is_refused(interrupted, data):
    wd = interrupted[0]
    mixed, _, tokenizer, _ = data
    step = _checkpoints(wd)[-1]
    r = _run(_args(wd, mixed, tokenizer) + [f"--config.total_steps={step - 1}"])
    assert r.returncode == 2
    assert _one_line(r.stderr).startswith(f"dsvl-train: config error: {wd} holds checkpoint {step}, past "
                                          f"config.total_steps={step - 1}")
    assert _checkpoints(wd)[-1] == step


def test_resuming_with_another_model_is_refused(interrupted, data):
    wd = interrupted[0]
    mixed, _, tokenizer, _ = data
    r = _run(_args(wd, mixed, tokenizer, "--config.model.text.intermediate_size=96"))
    assert r.returncode == 2
    line = _one_line(r.stderr)
    m = re.fullmatch(rf"dsvl-train: config error: {re.escape(wd)} holds a different model \(checkpoint \d+: "
                     r"param (\S+) has shape \(([\d, ]+)\) there, \(([\d, ]+)\) in config\.model; (\d+) param\(s\) "
                     r"differ\): resume with the config it was trained with .*", line)
    assert m and m.group(1).endswith("_proj/kernel") and "128" in m.group(2) and "96" in m.group(3), line
    assert m.group(4) == "3"  # gate, up and down (the layers are stacked)
    with open(os.path.join(wd, "model_config.json")) as f:  # the workdir's own files are left as they were
        assert json.load(f)["text"]["intermediate_size"] == 128
