"""Two real processes on loopback run the trainer as a TPU pod would: `dsvl-train --distributed` in each,
jax.distributed with a local coordinator, gloo collectives, 4 CPU devices per process, one 8-device mesh,
each process reading its own data shard (tpu/local_cluster.py starts them).

- Data shards: one process reading 2 shards yields exactly the rows that 2 processes reading one each
  assemble into the global batch (`config.data.shard_count`), and resumes them exactly.
- The two processes equal one process on 8 devices: the same records in every step, the same losses,
  the same parameters (both read the corpus as 2 data shards); also as two "slices" (`mesh.slices=2`,
  the hybrid mesh with one process a slice: heavy).
- kill -9 one of them mid-run: the other aborts within the heartbeat timeout, naming the cause.
- Start both again: they resume from the last complete checkpoint and end as one process does.

`make test` launches the pair twice (the killed run and its restart, which is then compared with one
process); `make test-heavy` adds the uninterrupted pair: it equals one process too, and the restarted run
equals it bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import pytest
from flax import traverse_util

from dsvl_jax.config import tiny
from dsvl_jax.convert.orbax_io import load_orbax_params
from dsvl_jax.data import loader as L
from dsvl_jax.data.mixture import SourceConfig
from dsvl_jax.processing.tokenizer import Tokenizer
from dsvl_jax.train.trainer import train
from tests.helpers.record_log import logging_records
from tests.helpers.train_fixtures import tiny_config
from tpu import local_cluster

STEPS, EVERY = 8, 4  # 8 steps: the same programs as the crash-safety test (shared through the compilation cache)
HEARTBEAT = 10  # seconds without a heartbeat before the survivor aborts
RUN_TIMEOUT = 600  # one launch (two compiles side by side) took 2-4 min on a 2-core machine at load 10
OVERRIDES = {"total_steps": STEPS, "log_every": 1, "checkpoint.every": EVERY, "data.shard_count": 2,
             "data.mm_warmup_steps": 0}


def _config_file(root: str, sources, tokenizer) -> str:
    """A config file for the CLI: the tiny stage-2 config reading the test corpus."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "run_config.py")
    with open(path, "w") as f:
        f.write(f"""import importlib.util
_spec = importlib.util.spec_from_file_location("tiny_cfg", {os.path.join(repo, "configs", "tiny.py")!r})
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config(arg="stage2"):
    c = _tiny.get_config(arg)
    c.data.sources = {sources!r}
    c.data.tokenizer = {tokenizer!r}
    return c
""")
    return path


def _train_args(config_file: str, workdir: str, extra=()) -> list[str]:
    return [f"--config={config_file}:stage2", f"--workdir={workdir}"] + \
        [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + list(extra)


def _launch(config_file: str, workdir: str, extra=()) -> local_cluster.Cluster:
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")  # as tests/conftest.py sets in-process
    # Each launch compiles from scratch (the persistent cache cannot serve several CPU processes, see
    # tpu/local_cluster.py); a cheaper LLVM pipeline takes ~30% off that and leaves the float32 results as
    # they are at the tolerances below.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    # the trainer CLI with the record-id log (records.<process>.log) of tests/helpers/record_log.py
    return local_cluster.start(_train_args(config_file, workdir, extra), num_processes=2, devices_per_process=4,
                               log_dir=workdir, heartbeat_timeout=HEARTBEAT, env=env, module="tests.helpers.record_log")


def _finish(cluster: local_cluster.Cluster, timeout: float = RUN_TIMEOUT) -> None:
    codes = cluster.wait(timeout)
    cluster.kill()
    if codes != [0, 0]:
        pytest.fail(f"exit codes {codes}\n" + "\n".join(f"--- process {i} ---\n{cluster.tail(i)}" for i in (0, 1)))


def _losses(workdir) -> dict[int, float]:
    """Train loss per step (a resumed run first drops the rows logged after its checkpoint: each step once)."""
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        d = json.loads(line)
        if d.get("split") == "train":
            out[d["step"]] = d["loss"]
    return out


def _codes(workdir, process: int) -> dict[int, list[int]]:
    out = {}
    for line in open(os.path.join(workdir, f"records.{process}.log")):
        d = json.loads(line)
        out[d["step"]] = d["codes"]
    return out


def _params(workdir):
    return traverse_util.flatten_dict(load_orbax_params(str(workdir))[1], sep="/")


def _complete_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("multiprocess")
    sources, tokenizer = corpus
    return root, sources, tokenizer, _config_file(str(root), sources, tokenizer)


@pytest.fixture(scope="module")
def one_process(setup):
    root, sources, tokenizer, _ = setup
    workdir = str(root / "one")
    with logging_records(os.path.join(workdir, "records.0.log")):
        train(tiny_config("stage2", sources, tokenizer, **OVERRIDES), workdir)
    return workdir


@pytest.fixture(scope="module")
def two_processes(setup):
    """The pair, never interrupted."""
    root, *_, config_file = setup
    workdir = str(root / "two")
    _finish(_launch(config_file, workdir))
    return workdir


@pytest.fixture(scope="module")
def two_slices(setup):
    """The pair as two "slices" (config.mesh.slices=2: one process a slice, the data axis across them, as
    DCN spans TPU slices), never interrupted."""
    root, *_, config_file = setup
    workdir = str(root / "two_slices")
    _finish(_launch(config_file, workdir, ["--config.mesh.slices=2"]))
    return workdir


@pytest.fixture(scope="module")
def killed_and_resumed(setup):
    """The pair, process 1 killed with SIGKILL once the first checkpoint is complete, then both started again.
    Returns (workdir, what happened to process 0, the last complete checkpoint before the restart)."""
    root, *_, config_file = setup
    workdir = str(root / "killed")
    cluster = _launch(config_file, workdir)
    deadline = time.monotonic() + RUN_TIMEOUT
    while EVERY not in _complete_steps(workdir):  # the first checkpoint is complete: kill mid-run
        if any(p.poll() is not None for p in cluster.processes) or time.monotonic() > deadline:
            cluster.kill()
            pytest.fail("the run ended before the first checkpoint\n" + cluster.tail(0))
        time.sleep(0.02)
    cluster.processes[1].kill()
    killed_at = time.monotonic()
    codes = cluster.wait(HEARTBEAT + 50)
    waited = time.monotonic() - killed_at
    cluster.kill()
    print(f"process 0 exited with code {codes[0]} {waited:.1f} s after process 1 was killed "
          f"(heartbeat timeout {HEARTBEAT} s)")
    survivor = dict(code=codes[0], waited=waited, log=cluster.tail(0, 20000))
    done = _complete_steps(workdir)
    _finish(_launch(config_file, workdir))  # both again, same command
    return workdir, survivor, done


def test_data_shards_reassemble_the_one_process_batch(setup):
    _, sources, tokenizer, _ = setup
    dc = L.DataConfig(sources=tuple(SourceConfig(**s) for s in sources), shard_count=2, max_images_per_row=2)
    kw = dict(batch_size=8, seq_len=160, seed=3)
    tok = Tokenizer.from_file(tokenizer)
    one = L.make_train_iterator(dc, tiny(), tok, process_index=0, process_count=1, **kw)
    two = [L.make_train_iterator(dc, tiny(), tok, process_index=p, process_count=2, **kw) for p in (0, 1)]
    for _ in range(3):
        a, b = next(one), [next(it) for it in two]
        assert a.keys() == b[0].keys()
        for k in a:
            np.testing.assert_array_equal(a[k], np.concatenate([b[0][k], b[1][k]]), err_msg=k)
        assert (a["image_mask"].any() and (a["record_index"] >= 0).sum() > 8)  # images, several examples a row
    # one process holding two shards saves both and resumes both exactly
    state = json.loads(json.dumps(one.get_state()))
    assert set(state["streams"]) == {"text@0", "multimodal@0", "text@1", "multimodal@1"}
    resumed = L.make_train_iterator(dc, tiny(), tok, process_index=0, process_count=1, **kw)
    resumed.set_state(state)
    for _ in range(2):
        a, b = next(one), next(resumed)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="shard_count=3 must be a multiple of process_count=2"):
        L.make_train_iterator(dataclasses.replace(dc, shard_count=3), tiny(), tok, process_index=0, process_count=2,
                              **kw)


def _assert_equal_one(one_process, two_processes):
    # the data: process p's rows are data shard p; together they are the single process's batch
    one, two = _codes(one_process, 0), [_codes(two_processes, p) for p in (0, 1)]
    assert sorted(one) == sorted(two[0]) == sorted(two[1]) == list(range(STEPS))
    for step in one:
        assert two[0][step] + two[1][step] == one[step], step
    # the losses (the same step on the same 8 devices; the collectives (in-process vs gloo) and the LLVM
    # optimisation level differ)
    a, b = _losses(one_process), _losses(two_processes)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= 1e-5, worst
    # the parameters, as saved by Orbax from each run
    pa, pb = _params(one_process), _params(two_processes)
    assert pa.keys() == pb.keys()
    worst = max(float(np.abs(np.asarray(pa[k], np.float64) - np.asarray(pb[k], np.float64)).max()) for k in pa)
    assert worst <= 1e-5, worst


@pytest.mark.slow
def test_killed_process_stops_the_other_and_restart_resumes(killed_and_resumed):
    workdir, survivor, done = killed_and_resumed
    assert survivor["code"] is not None, f"process 0 still running {survivor['waited']:.0f} s after process 1 died"
    assert survivor["code"] != 0, "process 0 finished the run although process 1 was killed mid-run"
    log = survivor["log"]
    assert "another task died" in log or "stopped sending heartbeats" in log, log[-3000:]
    assert EVERY <= done[-1] < STEPS, done
    log = open(os.path.join(workdir, "process_0.log")).read()
    assert f"resumed from {workdir} at step {done[-1]}" in log
    assert _complete_steps(workdir)[-1] == STEPS


@pytest.mark.slow
def test_two_processes_through_a_restart_equal_one(one_process, killed_and_resumed):
    _assert_equal_one(one_process, killed_and_resumed[0])


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_equal_one(one_process, two_processes):
    _assert_equal_one(one_process, two_processes)


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_as_two_slices_equal_one(one_process, two_slices):
    log = open(os.path.join(two_slices, "process_0.log")).read()
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in log, log[-2000:]
    _assert_equal_one(one_process, two_slices)


@pytest.mark.slow
@pytest.mark.heavy
def test_restart_ends_bit_identical_to_the_uninterrupted_run(two_processes, killed_and_resumed):
    workdir, _, done = killed_and_resumed
    pa, pb = _params(two_processes), _params(workdir)
    assert pa.keys() == pb.keys()
    assert all(np.array_equal(np.asarray(pa[k]), np.asarray(pb[k])) for k in pa)
    a, b = _losses(two_processes), _losses(workdir)
    assert all(a[s] == b[s] for s in range(done[-1] + 1, STEPS + 1))
