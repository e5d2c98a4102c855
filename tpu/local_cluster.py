r"""Run `dsvl-train` as N processes on this machine, joined by JAX's own multi-host runtime over loopback.

The same code path as a TPU pod (every process calls `jax.distributed.initialize`, reads its own data
shards and holds part of one global mesh), with CPU devices and gloo collectives instead of TPU chips
and ICI, so the multi-host path can be tried (and tested) before paying for a slice:

    python tpu/local_cluster.py --num_processes 2 --devices_per_process 4 -- \
        --config configs/tiny.py:stage2 --workdir /tmp/tiny2 \
        --config.data.tokenizer=DIR/tokenizer.json --config.data.sources='[...]'

Logs go to `<workdir>/process_<i>.log` (or --log_dir). When one process dies the others abort after
--heartbeat_timeout seconds (JAX's coordination service), so the launcher never hangs; it exits with
the first non-zero return code. Start it again with the same arguments to resume from the last
complete checkpoint.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port nobody listens on right now (the coordinator binds it moments later)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(devices_per_process: int, base: dict | None = None) -> dict:
    """Environment of one CPU process: `devices_per_process` host devices, gloo for cross-process collectives."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    # No persistent compilation cache: on CPU its key holds each process's device assignment and only
    # process 0 writes, so process 0 alone would hit it and run a full compile ahead of the others,
    # past gloo's fixed 30 s rendezvous on the first collective ("Gloo context initialization failed").
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env["PYTHONUNBUFFERED"] = "1"  # a process that aborts must not lose its last log lines
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def process_command(process_id: int, num_processes: int, coordinator: str, train_args: list[str], *,
                    heartbeat_timeout: int = 100, initialization_timeout: int = 300,
                    python: str = sys.executable, module: str = "dsvl_jax.train.cli") -> list[str]:
    return [python, "-m", module, "--distributed", f"--coordinator={coordinator}",
            f"--num_processes={num_processes}", f"--process_id={process_id}",
            f"--heartbeat_timeout={heartbeat_timeout}", f"--initialization_timeout={initialization_timeout}",
            *train_args]


@dataclass
class Cluster:
    processes: list[subprocess.Popen]
    logs: list[str]

    def wait(self, timeout: float) -> list[int | None]:
        """Return codes once all exit, or None for those still running after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes):
            time.sleep(0.05)
        return [p.poll() for p in self.processes]

    def kill(self):
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()

    def tail(self, i: int, chars: int = 3000) -> str:
        with open(self.logs[i], errors="replace") as f:
            return f.read()[-chars:]


def start(train_args: list[str], *, num_processes: int, devices_per_process: int, log_dir: str,
          port: int | None = None, heartbeat_timeout: int = 100, initialization_timeout: int = 300,
          env: dict | None = None, python: str = sys.executable, module: str = "dsvl_jax.train.cli") -> Cluster:
    """Launch the processes (process 0 hosts the coordinator on localhost:port); logs in log_dir. `module`: what
    `python -m` runs (the trainer CLI, or a test's wrapper of it)."""
    coordinator = f"localhost:{port or free_port()}"
    os.makedirs(log_dir, exist_ok=True)
    penv = process_env(devices_per_process, env)
    procs, logs = [], []
    for i in range(num_processes):
        logs.append(os.path.join(log_dir, f"process_{i}.log"))
        cmd = process_command(i, num_processes, coordinator, train_args, heartbeat_timeout=heartbeat_timeout,
                              initialization_timeout=initialization_timeout, python=python, module=module)
        with open(logs[-1], "a") as log:
            procs.append(subprocess.Popen(cmd, env=penv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    return Cluster(procs, logs)


def _workdir(train_args: list[str]) -> str | None:
    for i, a in enumerate(train_args):
        if a.startswith("--workdir="):
            return a.split("=", 1)[1]
        if a == "--workdir" and i + 1 < len(train_args):
            return train_args[i + 1]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: local_cluster.py [options] -- <dsvl-train arguments>", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=4)
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("--heartbeat_timeout", type=int, default=30)
    p.add_argument("--log_dir", default=None, help="default: the --workdir of the training arguments")
    args = p.parse_args(argv[:cut])
    train_args = argv[cut + 1:]
    log_dir = args.log_dir or _workdir(train_args)
    if not log_dir:
        print("local_cluster.py: give --workdir among the training arguments (or --log_dir)", file=sys.stderr)
        return 2
    cluster = start(train_args, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                    log_dir=log_dir, port=args.port, heartbeat_timeout=args.heartbeat_timeout)
    print(f"{args.num_processes} processes; logs: {', '.join(cluster.logs)}", flush=True)
    try:
        while True:
            codes = [q.poll() for q in cluster.processes]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:  # the others abort on their own within the heartbeat timeout; give them that long
                cluster.wait(args.heartbeat_timeout + 30)
                cluster.kill()
                for i in range(args.num_processes):
                    print(f"--- process {i}: exit code {cluster.processes[i].returncode} ---\n{cluster.tail(i)}")
                code = codes[failed[0]]
                return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
            if all(c == 0 for c in codes):
                print(cluster.tail(0, 1000))
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        cluster.kill()
        return 130


if __name__ == "__main__":
    sys.exit(main())
