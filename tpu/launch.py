r"""Cloud TPU launcher: create a TPU VM (or a queued resource, on-demand or spot), install the project on
every worker, sync the code, start `dsvl-train --distributed` on all workers, follow the logs, stop,
delete. It only shells out to `gcloud compute tpus ...` with `--worker=all`; the processes then join
through JAX's own multi-host runtime (`jax.distributed.initialize()` finds the slice by itself).

    python tpu/launch.py --project P --zone us-east5-a --name dsvl --accelerator v5p-64 --spot --queued \
        --bucket BUCKET all -- --config configs/tpu/v5p_64.py:7b_stage2,data=/mnt/gcs/dsvl/mixture.json \
        --workdir /mnt/gcs/dsvl/runs/7b_s2 --config.init.from_checkpoint=/mnt/gcs/dsvl/runs/7b_s1
    python tpu/launch.py ... logs          # follow worker 0 (--worker N for another)
    python tpu/launch.py ... stop          # SIGTERM on every worker: save a checkpoint, exit
    python tpu/launch.py ... delete

Subcommands: create | install | sync | mount | train | logs | stop | status | delete | all (create,
sync, install, mount when --bucket is given, train). `--dry-run` prints every command (one per line,
shell-quoted) and calls nothing. Starting `train` again after a preemption resumes from the last
complete checkpoint in --workdir.

Multi-slice (`--slices N`, needs `--queued`): one queued resource with N slices of --accelerator joined by
DCN (`--node-count=N --node-prefix=NAME`: slices NAME-0 ... NAME-{N-1}); every worker of every slice is
reached through `queued-resources ssh/scp --node=all --worker=all`, and `train` adds
`--config.mesh.slices=N` (the data axis spans the slices; fsdp and tensor stay inside one).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_VERSION = "0.10.2"  # = setup.py's pin; jax[tpu] brings the libtpu built for it

# TPU software version per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5e": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}

MOUNT = "/mnt/gcs"  # where `mount` puts the bucket on every worker: one workdir path for all hosts
REMOTE_DIR = "dsvl_jax"  # under the worker's home
REMOTE_VENV = "dsvl_venv"
LOG = "dsvl_train.log"
PID = "dsvl_train.pid"
SYNC_TARBALL = "dsvl_jax_sync.tgz"


def accelerator_type(name: str) -> str:
    """'v5e-16' → 'v5litepod-16' (gcloud's spelling); other names pass through after a format check."""
    m = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", name)
    if not m:
        raise SystemExit(f"--accelerator {name!r}: expected <generation>-<size> with generation in "
                         f"v4, v5e (= v5litepod), v5p, v6e, e.g. v5p-64")
    gen, size = m.groups()
    return f"v5litepod-{size}" if gen == "v5e" else name


def runtime_version(accelerator: str) -> str:
    return RUNTIME_VERSIONS[accelerator_type(accelerator).split("-")[0]]


class Runner:
    """Prints each command; runs it unless dry. `capture` returns stdout (dry: the `dry_answer`)."""

    def __init__(self, dry_run: bool, out=sys.stdout):
        self.dry_run, self.out = dry_run, out

    def run(self, cmd: list[str], *, check: bool = True) -> int:
        print(shlex.join(cmd), file=self.out, flush=True)
        if self.dry_run:
            return 0
        return subprocess.run(cmd, check=check).returncode

    def capture(self, cmd: list[str], dry_answer: str = "") -> str:
        print(shlex.join(cmd), file=self.out, flush=True)
        if self.dry_run:
            return dry_answer
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


class Tpu:
    """The gcloud commands for one TPU VM (a single- or multi-host slice)."""

    def __init__(self, args, runner: Runner):
        self.a, self.r = args, runner
        self.where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])

    # -- life cycle --------------------------------------------------------------------------------
    def create(self):
        a = self.a
        acc, version = accelerator_type(a.accelerator), a.runtime_version or runtime_version(a.accelerator)
        if a.queued:
            nodes = [f"--node-count={a.slices}", f"--node-prefix={a.name}"] if a.slices > 1 else [f"--node-id={a.name}"]
            cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", a.name, *nodes,
                   *self.where, f"--accelerator-type={acc}", f"--runtime-version={version}"]
            if a.spot:
                cmd.append("--spot")
            if a.valid_until:
                cmd.append(f"--valid-until-duration={a.valid_until}")
            self.r.run(cmd)
            self.wait_active()
        else:
            cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *self.where,
                   f"--accelerator-type={acc}", f"--version={version}"]
            if a.spot:
                cmd.append("--spot")
            self.r.run(cmd)

    def wait_active(self):
        """Poll the queued resource until ACTIVE (FAILED / SUSPENDED end the wait with an error)."""
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "describe", self.a.name, *self.where,
               "--format=value(state.state)"]
        deadline = time.monotonic() + self.a.wait_hours * 3600
        while True:
            state = self.r.capture(cmd, dry_answer="ACTIVE")
            if state == "ACTIVE":
                return
            if state in ("FAILED", "SUSPENDED"):
                raise SystemExit(f"queued resource {self.a.name}: {state} (see `{shlex.join(cmd[:-1])}`)")
            if time.monotonic() > deadline:
                raise SystemExit(f"queued resource {self.a.name} still {state} after {self.a.wait_hours} h")
            print(f"  {self.a.name}: {state}; next check in {self.a.poll_seconds} s", flush=True)
            time.sleep(self.a.poll_seconds)

    def status(self):
        kind = "queued-resources" if self.a.queued else "tpu-vm"
        self.r.run(["gcloud", "compute", "tpus", kind, "describe", self.a.name, *self.where])

    def delete(self):
        if self.a.queued:  # --force also deletes the TPU VM the request created
            self.r.run(["gcloud", "compute", "tpus", "queued-resources", "delete", self.a.name, *self.where,
                        "--force", "--quiet"])
        else:
            self.r.run(["gcloud", "compute", "tpus", "tpu-vm", "delete", self.a.name, *self.where, "--quiet"])

    # -- on the workers ----------------------------------------------------------------------------
    def _on_workers(self, verb: str, worker: str, node: str = "all") -> list[str]:
        """`tpu-vm ssh|scp` on one slice; `queued-resources ssh|scp` with --node across the slices."""
        if self.a.slices > 1:
            return ["gcloud", "compute", "tpus", "queued-resources", verb, f"--node={node}", f"--worker={worker}"]
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, f"--worker={worker}"]

    def ssh(self, command: str, worker: str = "all", check: bool = True, node: str = "all"):
        head = self._on_workers("ssh", worker, node)
        return self.r.run(head[:5] + [self.a.name, *self.where] + head[5:] + [f"--command={command}"], check=check)

    def install(self):
        """A venv per worker with the project's pinned versions and the libtpu built for the pinned jax."""
        py = self.a.python
        self.ssh("; ".join([
            "set -e",
            f"if ! {py} -c 'import venv, ensurepip' 2>/dev/null; then sudo apt-get update -q; "
            f"sudo apt-get install -y -q {py} {py}-venv; fi",
            f"if [ ! -d ~/{REMOTE_VENV} ]; then {py} -m venv ~/{REMOTE_VENV}; fi",
            f"~/{REMOTE_VENV}/bin/pip install -q --upgrade pip",
            f"~/{REMOTE_VENV}/bin/pip install -q -e ~/{REMOTE_DIR}",
            f"~/{REMOTE_VENV}/bin/pip install -q 'jax[tpu]=={JAX_VERSION}'",
            f"~/{REMOTE_VENV}/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'",
        ]))

    def sync(self):
        """The working tree (tracked and untracked-but-not-ignored files) → ~/dsvl_jax on every worker."""
        tarball = os.path.join(self.a.tmp_dir, SYNC_TARBALL)
        self.r.run(["bash", "-c", f"git -C {shlex.quote(REPO)} ls-files -z --cached --others --exclude-standard | "
                                  f"tar -C {shlex.quote(REPO)} --null -T - -czf {shlex.quote(tarball)}"])
        head = self._on_workers("scp", "all")
        self.r.run(head[:5] + [tarball, f"{self.a.name}:~/{SYNC_TARBALL}", *self.where] + head[5:])
        self.ssh(f"mkdir -p ~/{REMOTE_DIR} && tar -xzf ~/{SYNC_TARBALL} -C ~/{REMOTE_DIR}")

    def mount(self):
        """The bucket at /mnt/gcs on every worker (Cloud Storage FUSE): the workdir every host must share."""
        if not self.a.bucket:
            raise SystemExit("mount: give --bucket NAME (a hierarchical-namespace bucket: atomic folder renames)")
        repo = "gcsfuse-$(lsb_release -cs)"
        self.ssh("; ".join([
            "set -e",
            "if ! command -v gcsfuse >/dev/null; then "
            "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
            "sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; "
            f"echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt {repo} "
            "main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list; sudo apt-get update -q; "
            "sudo apt-get install -y -q gcsfuse; fi",
            f"sudo mkdir -p {MOUNT}; sudo chown $USER {MOUNT}",
            f"mountpoint -q {MOUNT} || gcsfuse --implicit-dirs {shlex.quote(self.a.bucket)} {MOUNT}",
        ]))

    def train(self, train_args: list[str]):
        """`dsvl-train --distributed ARGS` in the background on every worker (log and pid in ~)."""
        if self.a.slices > 1 and not any(t.startswith("--config.mesh.slices") for t in train_args):
            train_args = [*train_args, f"--config.mesh.slices={self.a.slices}"]
        cmd = f"~/{REMOTE_VENV}/bin/dsvl-train --distributed {shlex.join(train_args)}"  # ~ left for the shell
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.a.env)
        self.ssh(f"cd ~/{REMOTE_DIR} && {env + ' ' if env else ''}setsid nohup {cmd} > ~/{LOG} 2>&1 < /dev/null "
                 f"& echo $! > ~/{PID}")
        print(f"started on every worker of {self.a.name}; follow with: {self._self_cmd('logs')}", flush=True)

    def logs(self):
        self.ssh(f"tail -n {self.a.lines} {'-f ' if self.a.follow else ''}~/{LOG}", worker=self.a.worker,
                 check=False, node=self.a.node)

    def stop(self):
        """SIGTERM: the trainer saves a checkpoint at the end of the current step and exits (all workers agree)."""
        self.ssh(f"test -f ~/{PID} && kill -TERM $(cat ~/{PID}) || echo 'no training process'", check=False)

    def _self_cmd(self, sub: str) -> str:
        a = self.a
        flags = [f"--zone={a.zone}", f"--name={a.name}", f"--accelerator={a.accelerator}"]
        flags += [f"--project={a.project}"] if a.project else []
        flags += ["--queued"] if a.queued else []
        flags += [f"--slices={a.slices}"] if a.slices > 1 else []
        return shlex.join(["python", "tpu/launch.py", *flags, sub])


def parse(argv: list[str]):
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="tpu/launch.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("create", "install", "sync", "mount", "train", "logs", "stop", "status",
                                       "delete", "all"))
    p.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT"), help="GCP project (default: "
                   "gcloud's configured one)")
    p.add_argument("--zone", required=True, help="e.g. us-east5-a (v5p), us-west4-a (v5e), us-central2-b (v4)")
    p.add_argument("--name", required=True, help="TPU VM name (also the queued-resource id)")
    p.add_argument("--accelerator", required=True, help="v4-8, v5e-16, v5e-256, v5p-8, v5p-64, ...")
    p.add_argument("--runtime-version", default=None, help="default: the generation's JAX base image")
    p.add_argument("--spot", action="store_true", help="spot capacity (cheaper; can be preempted at any time)")
    p.add_argument("--queued", action="store_true", help="request through a queued resource (waits for capacity)")
    p.add_argument("--slices", type=int, default=1, help="multi-slice: this many slices of --accelerator joined by "
                   "DCN, one queued resource (needs --queued)")
    p.add_argument("--valid-until", default=None, help="queued: give up after this long, e.g. 6h")
    p.add_argument("--wait-hours", type=float, default=24.0, help="queued: how long `create` waits for ACTIVE")
    p.add_argument("--poll-seconds", type=int, default=60)
    p.add_argument("--bucket", default=None, help="mount: the GCS bucket (name, no gs://) for /mnt/gcs")
    p.add_argument("--python", default="python3.11", help="interpreter on the workers")
    p.add_argument("--env", action="append", default=[], type=lambda s: tuple(s.split("=", 1)), metavar="K=V",
                   help="environment for dsvl-train on every worker (repeatable)")
    p.add_argument("--worker", default="0", help="logs: which worker (a number or all)")
    p.add_argument("--node", default="0", help="logs with --slices: which slice (a number or all)")
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--no-follow", dest="follow", action="store_false")
    p.add_argument("--tmp-dir", default="/tmp", help="where `sync` writes its tarball locally")
    p.add_argument("--dry-run", action="store_true", help="print every command, call nothing")
    args = p.parse_args(argv)
    accelerator_type(args.accelerator)  # fail on a bad name before anything runs
    if args.slices < 1 or (args.slices > 1 and not args.queued):
        raise SystemExit(f"--slices {args.slices}: a positive number, and more than 1 needs --queued "
                         f"(multi-slice capacity comes only through a queued resource)")
    for kv in args.env:
        if len(kv) != 2 or not kv[0]:
            raise SystemExit(f"--env {'='.join(kv)!r}: expected KEY=VALUE")
    return args, train_args


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse(sys.argv[1:] if argv is None else argv)
    tpu = Tpu(args, Runner(args.dry_run))
    steps = {"create": [tpu.create], "install": [tpu.install], "sync": [tpu.sync], "mount": [tpu.mount],
             "train": [lambda: tpu.train(train_args)], "logs": [tpu.logs], "stop": [tpu.stop],
             "status": [tpu.status], "delete": [tpu.delete],
             "all": [tpu.create, tpu.sync, tpu.install] + ([tpu.mount] if args.bucket else [])
             + [lambda: tpu.train(train_args)]}[args.command]
    if args.command in ("train", "all") and not train_args:
        raise SystemExit(f"{args.command}: give the dsvl-train arguments after `--` (--config ... --workdir ...)")
    try:
        for step in steps:
            step()
    except subprocess.CalledProcessError as e:
        print(f"tpu/launch.py: `{shlex.join(e.cmd)}` failed with exit code {e.returncode}", file=sys.stderr)
        return e.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
