"""benchmarks/device_check.py, the accelerator check: its --dry-run prints every row of the table with a finite
number, in interpreters where grain, array_record, ml_collections and tensorflow_datasets cannot be imported
(the GPU image lacks them); and its batch fit (device_cases.fit_rows) finds the most rows that fit."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from device_cases import fit_rows, timed_loop  # noqa: E402  (the standard library only, at import)
import device_check as D  # noqa: E402

BLOCKED = ("grain", "array_record", "ml_collections", "tensorflow_datasets")


def _blocking_env(tmp_path):
    """PYTHONPATH with a sitecustomize that makes the BLOCKED packages unimportable in every interpreter
    started with it (the script's workers included)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nfor _m in {BLOCKED!r}:\n    sys.modules[_m] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT]))
    # one CPU device, as the check uses (conftest forces 8 on the suite, which slows every compile)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def test_dry_run_prints_every_row_finite_without_the_data_packages(tmp_path):
    env = _blocking_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import grain"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "halted" in probe.stderr  # the block is real (grain is installed here)

    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "device_check.py"), "--dry-run", "--json",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# device check (dry run, tiny shapes): cpu")  # which device ran it
    table = {}
    for line in lines:
        if line.startswith("#") or line.startswith("row "):
            continue
        key, value = line.split()[:2]
        table[key] = float(value)
    assert list(table) == list(D.ROWS)
    assert all(math.isfinite(v) for v in table.values()), table
    assert 0 < table["train.mfu"] < 1 and table["train.step_s"] > 0
    assert 0 <= table["vs_torch.greedy_agreement"] <= 1
    saved = json.loads(out.read_text())
    assert set(D.ROWS) <= set(saved["rows"]) and not saved["errors"]


def _linear(fixed, per_row, calls):
    def plan(rows):
        calls.append(rows)
        return fixed + per_row * rows
    return plan


def test_fit_rows_finds_the_most_rows_under_the_target():
    # fixed 10, 3 a row, target 0.85 x 100 = 85 → 25 rows, whether the fixed-part guess is low or high
    for guess in (0.0, 14.0, 10.0):
        calls = []
        assert fit_rows(_linear(10, 3, calls), 100, first=2, max_rows=64, fill=0.85, fixed_guess=guess) == 25
        assert len(calls) <= 3 and calls[0] == 2
    calls = []  # first already too many: halves
    assert fit_rows(_linear(10, 50, calls), 100, first=2, max_rows=64, fill=0.85) == 1
    assert fit_rows(_linear(200, 1, []), 100, first=2, max_rows=64, fill=0.85) == 1  # nothing fits: the least
    assert fit_rows(_linear(10, 3, []), 100, first=2, max_rows=8, fill=0.85) == 8  # capped
    calls = []  # out of time after the first compile: keep it
    assert fit_rows(_linear(10, 3, calls), 100, first=2, max_rows=64, fill=0.85, time_left=lambda: False) == 2
    assert calls == [2]


def test_timed_loop_bounds_count_and_time():
    assert len(timed_loop(lambda: None, 5, 1e9)) == 5
    assert len(timed_loop(lambda: None, 5, 0.0)) == 1  # at least once, no new call after the time
