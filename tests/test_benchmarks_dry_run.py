"""Every benchmark command that the README or a config docstring shows runs, as written plus `--dry-run`:
the same script and code path at tiny shapes (the tiny presets, a few repeats), so documentation that
names a benchmark cannot rot. The real-shape figures come from running the commands without `--dry-run`
(README: measured figures).

Each run must exit 0, print no traceback, and print the line that shows its last section ran.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.test_readme_commands import ROOT, config_commands, readme_commands

BENCHMARK = re.compile(r"^python3? (benchmarks/[\w_]+\.py)\b")
# script → a line its dry run prints once its last section has run
LAST_LINE = {
    "benchmarks/forward_vs_torch.py": r"SAM @\d+ alone .* \d+\.\d+",
    "benchmarks/convert_memory.py": r"target: peak",
    "benchmarks/data_throughput.py": r"1\.3b preprocessing[\s\S]*pipeline, 1 workers: +\d",
    "benchmarks/relpos_attention.py": r"CPU \(\d+ cores\)[\s\S]*reference +\d",
    "benchmarks/serve_load.py": r"batching speed-up: \d",
    "benchmarks/generate_vs_torch.py": r"tiny +\d.*dsvl_jax int8 x1dev +\d[\s\S]*same greedy tokens",
    "benchmarks/quant_error.py": r"int8: max rel error \d",
    "benchmarks/lora_vs_full.py": r"LoRA r=4 / full fine-tuning: trainable params 0\.\d+",
}
# run by tests/test_device_check.py (its --dry-run is checked row by row there)
ELSEWHERE = {"benchmarks/device_check.py"}
# `make test-heavy` only: six subprocesses (a checkpoint, two transformers and three dsvl_jax sides), ~50 s on
# 2 cores, which `make test`'s 12-minute budget does not hold; test_generation* and test_quant cover its parts.
HEAVY = {"benchmarks/generate_vs_torch.py"}


def documented_benchmark_commands() -> list[str]:
    """One command per script (the first the docs show): a dry run fixes the shapes, so a second command of
    the same script, differing in its size flags, would run the same work again."""
    _, _, others = readme_commands()
    docs = others + [c for cmds in config_commands().values() for c in cmds]
    first = {}
    for c in docs:
        m = BENCHMARK.match(c)
        if m and m.group(1) not in ELSEWHERE:
            first.setdefault(m.group(1), c)
    return sorted(first.values())


COMMANDS = documented_benchmark_commands()
PARAMS = [pytest.param(c, marks=pytest.mark.heavy) if BENCHMARK.match(c).group(1) in HEAVY else c for c in COMMANDS]


def test_the_docs_name_the_benchmarks():
    scripts = {BENCHMARK.match(c).group(1) for c in COMMANDS}
    assert {"benchmarks/forward_vs_torch.py", "benchmarks/serve_load.py"} <= scripts, COMMANDS
    assert scripts <= set(LAST_LINE), f"a documented benchmark has no dry-run check here: {scripts - set(LAST_LINE)}"


@pytest.mark.parametrize("command", PARAMS)
def test_documented_benchmark_runs_dry(command):
    script = BENCHMARK.match(command).group(1)
    argv = [sys.executable] + command.split()[1:] + ["--dry-run"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{command} --dry-run: exit {r.returncode}\n{out[-4000:]}"
    assert "Traceback (most recent call last)" not in out, out[-4000:]
    assert re.search(LAST_LINE[script], r.stdout), f"{command} --dry-run did not finish its table:\n{r.stdout[-3000:]}"
