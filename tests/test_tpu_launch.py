"""tpu/launch.py: --dry-run prints every gcloud command in order and calls nothing; without --dry-run
exactly the printed commands run (against a stand-in `gcloud` on PATH that records its arguments)."""
from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "tpu", "launch.py")
TRAIN = ["--config", "configs/tpu/v5p_64.py:7b_stage2,data=/mnt/gcs/dsvl/mixture.json",
         "--workdir", "/mnt/gcs/dsvl/runs/7b_s2", "--config.init.from_checkpoint=/mnt/gcs/dsvl/runs/7b_s1"]
POD = ["--project", "my-proj", "--zone", "us-east5-a", "--name", "dsvl", "--accelerator", "v5p-64"]


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` that appends its argv (JSON) to calls.jsonl and answers ACTIVE to `describe`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    script = bin_dir / "gcloud"
    script.write_text(f"""#!{sys.executable}
import json, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
    print("ACTIVE")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return env, log


def _launch(args, env, tmp_path):
    return subprocess.run([sys.executable, LAUNCH, "--tmp-dir", str(tmp_path), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.startswith(("gcloud ", "bash "))]


def _flag(cmd, name):
    hits = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    assert len(hits) == 1, (name, cmd)
    return hits[0]


def test_dry_run_prints_every_command_and_calls_nothing(fake_gcloud, tmp_path):
    env, log = fake_gcloud
    r = _launch(POD + ["--spot", "--queued", "--bucket", "my-bkt", "--dry-run", "all", "--", *TRAIN], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert not log.exists(), "gcloud was called during --dry-run"
    assert not (tmp_path / "dsvl_jax_sync.tgz").exists(), "the sync tarball was written during --dry-run"
    cmds = _commands(r.stdout)
    verbs = [" ".join(c[:5]) if c[0] == "gcloud" else "bash" for c in cmds]
    assert verbs == ["gcloud compute tpus queued-resources create", "gcloud compute tpus queued-resources describe",
                     "bash", "gcloud compute tpus tpu-vm scp"] + ["gcloud compute tpus tpu-vm ssh"] * 4
    create = cmds[0]
    assert create[5] == "dsvl" and "--spot" in create
    assert (_flag(create, "node-id"), _flag(create, "zone"), _flag(create, "project")) == ("dsvl", "us-east5-a",
                                                                                            "my-proj")
    assert (_flag(create, "accelerator-type"), _flag(create, "runtime-version")) == ("v5p-64", "v2-alpha-tpuv5")
    assert _flag(cmds[1], "format") == "value(state.state)"
    assert "git -C" in cmds[2][2] and "--exclude-standard" in cmds[2][2]
    for c in cmds[3:]:
        assert _flag(c, "worker") == "all" and _flag(c, "zone") == "us-east5-a"
    sync, install, mount, train = (_flag(c, "command") for c in cmds[4:])
    assert "tar -xzf ~/dsvl_jax_sync.tgz -C ~/dsvl_jax" in sync
    assert "pip install -q -e ~/dsvl_jax" in install and "'jax[tpu]==0.10.2'" in install
    assert mount.endswith("mountpoint -q /mnt/gcs || gcsfuse --implicit-dirs my-bkt /mnt/gcs")
    # the training command, as the worker's shell will split it
    started = shlex.split(train.split("setsid nohup ", 1)[1].split(" > ", 1)[0])
    assert started == ["~/dsvl_venv/bin/dsvl-train", "--distributed", *TRAIN]
    assert train.startswith("cd ~/dsvl_jax && ") and train.endswith("& echo $! > ~/dsvl_train.pid")


def test_the_commands_that_run_are_the_ones_printed(fake_gcloud, tmp_path):
    env, log = fake_gcloud
    args = POD + ["--env", "XLA_FLAGS=--xla_dump_to=/tmp/x", "all", "--", *TRAIN]
    dry = _launch(["--dry-run"] + args, env, tmp_path)
    assert not log.exists()
    real = _launch(args, env, tmp_path)
    assert real.returncode == 0, real.stderr
    called = [json.loads(line) for line in log.read_text().splitlines()]
    assert called == [c[1:] for c in _commands(dry.stdout) if c[0] == "gcloud"]
    assert called[0][:4] == ["compute", "tpus", "tpu-vm", "create"]  # not queued: a plain TPU VM
    assert "--spot" not in called[0] and "--version=v2-alpha-tpuv5" in called[0]
    # the sync tarball holds the working tree (and nothing git ignores)
    listing = subprocess.run(["tar", "-tzf", str(tmp_path / "dsvl_jax_sync.tgz")], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "tpu/launch.py" in listing and "setup.py" in listing
    assert not any(p.startswith(".venv/") for p in listing)
    assert "XLA_FLAGS=--xla_dump_to=/tmp/x setsid nohup" in _flag(called[-1], "command")


@pytest.mark.parametrize("accelerator, gcloud_type, version", [
    ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5e-256", "v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v4-8", "v4-8", "tpu-ubuntu2204-base"), ("v5p-8", "v5p-8", "v2-alpha-tpuv5"),
])
def test_generations_map_to_gcloud_names_and_images(fake_gcloud, tmp_path, accelerator, gcloud_type, version):
    env, _ = fake_gcloud
    r = _launch(["--zone", "z", "--name", "n", "--accelerator", accelerator, "--dry-run", "create"], env, tmp_path)
    (create,) = _commands(r.stdout)
    assert (_flag(create, "accelerator-type"), _flag(create, "version")) == (gcloud_type, version)


def test_delete_logs_stop(fake_gcloud, tmp_path):
    env, _ = fake_gcloud
    out = {sub: _commands(_launch(POD + ["--queued", "--dry-run", sub], env, tmp_path).stdout)
           for sub in ("delete", "logs", "stop")}
    assert out["delete"][0][3:6] == ["queued-resources", "delete", "dsvl"] and "--force" in out["delete"][0]
    assert _flag(out["logs"][0], "worker") == "0" and _flag(out["logs"][0], "command") == \
        "tail -n 100 -f ~/dsvl_train.log"
    assert _flag(out["stop"][0], "worker") == "all" and "kill -TERM $(cat ~/dsvl_train.pid)" in \
        _flag(out["stop"][0], "command")


@pytest.mark.parametrize("args, message", [
    (["--accelerator", "v5x-8", "create"], "--accelerator 'v5x-8'"),
    (["--accelerator", "v5p-8", "train"], "give the dsvl-train arguments after `--`"),
    (["--accelerator", "v5p-8", "--env", "NOEQUALS", "create"], "--env 'NOEQUALS': expected KEY=VALUE"),
])
def test_bad_arguments_name_the_problem(fake_gcloud, tmp_path, args, message):
    env, log = fake_gcloud
    r = _launch(["--zone", "z", "--name", "n", *args], env, tmp_path)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert not log.exists()


def test_the_workers_get_the_pinned_jax():
    import re

    from tpu import launch

    pinned = re.search(r'"jax==([^"]+)"', open(os.path.join(REPO, "setup.py")).read()).group(1)
    assert launch.JAX_VERSION == pinned


def test_multi_slice_dry_run_uses_one_queued_resource_and_reaches_every_slice(fake_gcloud, tmp_path):
    env, log = fake_gcloud
    r = _launch(POD + ["--spot", "--queued", "--slices", "2", "--bucket", "my-bkt", "--dry-run", "all", "--",
                       *TRAIN], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert not log.exists()
    cmds = _commands(r.stdout)
    verbs = [" ".join(c[:5]) if c[0] == "gcloud" else "bash" for c in cmds]
    assert verbs == ["gcloud compute tpus queued-resources create", "gcloud compute tpus queued-resources describe",
                     "bash", "gcloud compute tpus queued-resources scp"] + \
        ["gcloud compute tpus queued-resources ssh"] * 4
    create = cmds[0]
    assert (_flag(create, "node-count"), _flag(create, "node-prefix")) == ("2", "dsvl")
    assert not any(a.startswith("--node-id") for a in create) and "--spot" in create
    assert cmds[3][6] == "dsvl:~/dsvl_jax_sync.tgz"
    for c in cmds[3:]:
        assert (_flag(c, "node"), _flag(c, "worker")) == ("all", "all") and c[5] in ("dsvl", cmds[3][5]), c
    train = _flag(cmds[-1], "command")
    started = shlex.split(train.split("setsid nohup ", 1)[1].split(" > ", 1)[0])
    assert started == ["~/dsvl_venv/bin/dsvl-train", "--distributed", *TRAIN, "--config.mesh.slices=2"]
    (logs,) = _commands(_launch(POD + ["--queued", "--slices", "2", "--node", "1", "--dry-run", "logs"], env,
                                tmp_path).stdout)
    assert (_flag(logs, "node"), _flag(logs, "worker")) == ("1", "0")


def test_multi_slice_needs_a_queued_resource(fake_gcloud, tmp_path):
    env, log = fake_gcloud
    r = _launch(POD + ["--slices", "2", "create"], env, tmp_path)
    assert r.returncode != 0 and "--slices 2" in r.stderr and "--queued" in r.stderr, r.stderr
    assert not log.exists()
