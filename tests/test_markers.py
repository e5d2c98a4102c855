"""`make test` runs every test but the heavy ones and `make test-heavy` exactly the heavy ones: the Makefile's
pytest command lines, with the repository's pytest.ini, run on a scratch suite with one test of each kind."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRATCH = '''
import pytest

def test_plain():
    pass

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.heavy
def test_heavy():
    pass

@pytest.mark.parametrize("size", ["short", pytest.param("full", marks=pytest.mark.heavy)])
def test_sized(size):
    pass
'''
HEAVY = {"test_heavy", "test_sized[full]"}
ALL = {"test_plain", "test_slow", "test_sized[short]"} | HEAVY


def _make_args(target: str) -> list[str]:
    """The pytest arguments of a Makefile target's recipe (`$(BIN)/python -m pytest ARGS`)."""
    text = open(os.path.join(ROOT, "Makefile")).read()
    recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    (line,) = [x for x in recipe.splitlines() if "-m pytest" in x]
    for name, value in re.findall(r"^(\w+) \?= *(.*)$", text, re.M):  # the recipe's make variables
        line = line.replace(f"$({name})", value.strip())
    args = shlex.split(line.split("-m pytest", 1)[1])
    assert "$(" not in " ".join(args), line
    out, skip = [], False
    for a in args:  # -q (-qq would hide the node ids) and the xdist options, which do not select tests
        if not skip and a not in ("-q", "-n", "--dist"):
            out.append(a)
        skip = a in ("-n", "--dist")
    return out


def _selected(tmp_path, args: list[str]) -> set[str]:
    shutil.copy(os.path.join(ROOT, "pytest.ini"), tmp_path / "pytest.ini")
    (tmp_path / "tests").mkdir(exist_ok=True)
    (tmp_path / "tests" / "test_scratch.py").write_text(SCRATCH)
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 5), r.stdout + r.stderr  # 5: nothing selected
    return {line.split("::", 1)[1] for line in r.stdout.splitlines() if "::" in line}


@pytest.mark.parametrize("target, want", [("test", ALL - HEAVY), ("test-heavy", HEAVY)])
def test_make_targets_select_by_the_heavy_marker(tmp_path, target, want):
    assert _selected(tmp_path, _make_args(target)) == want


def test_bare_pytest_skips_the_heavy_tests(tmp_path):
    assert _selected(tmp_path, ["tests"]) == ALL - HEAVY
