"""Every ahead-of-time compile command that README.md, tpu/README.md or a config docstring shows
(`python tools/aot_compile.py`, `python tpu/compile_all.py`, `python tools/aot_decode.py`) runs exactly as
written plus `--dry-run`: the same arguments checked as a real run checks them, the same topology (libtpu),
slices and mesh, a tiny model of the config's layout at tiny shapes (`dsvl_jax.train.aot_dry_run`). The
real-shape figures take 15-30 min a compile and come from running the commands without `--dry-run`.

All commands of one group run in ONE subprocess (`tests.helpers.run_tool_mains`: each tool's `main(argv)` in
turn, jax and libtpu loaded once). Each must exit 0, print no traceback, say that it is a dry run and print its
memory-per-chip line. `make test` runs the cheap group (one command of each tool, SigLIP-only layouts); the
rest, each a tiny hybrid compile of 5-15 s or a whole slice list, is `make test-heavy`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from dsvl_jax import config as C
from dsvl_jax.train import aot
from dsvl_jax.train.aot_dry_run import DRY_RUN_BANNER, tiny_model_like
from tests.test_readme_commands import ROOT, config_commands, readme_commands, tpu_readme_commands
from tpu import compile_all

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed"),
]

AOT = re.compile(r"^python3? (tools/aot_compile\.py|tpu/compile_all\.py|tools/aot_decode\.py)\b")
# tool → its report's memory line (one per compile)
MEMORY_LINE = {
    "tools/aot_compile.py": r"^  memory per chip: arguments [\d.e+-]+ GiB, .* temp [\d.e+-]+ -> total [\d.e+-]+ GiB "
                            r"of \d+ GiB HBM \(fits\)$",
    "tpu/compile_all.py": r"^ +memory [\d.e+-]+ of \d+ GiB per chip \(fits; temp [\d.e+-]+\)",
    "tools/aot_decode.py": r"^  (fp32|bf16|int8) +arguments per chip +[\d.]+ MiB \(weights \+ cache\), "
                           r"temp +[\d.]+ MiB",
}
# `make test`: one command of each tool (SigLIP-only layouts: the hybrid ones, 5-15 s a compile, are heavy; the
# hybrid train step's compile is in make test through tests/test_train_aot.py): about 20 s of CPU.
FAST = {
    "python tools/aot_decode.py --preset deepseek_vl_1p3b --topology v5e:2x2 --tensor 4",
    "python tools/aot_compile.py --config configs/deepseek_vl_1p3b.py:lora --topology v5p:2x2x1 --grad-accum 16",
    "python tpu/compile_all.py --only v5p_8",
}


def documented_aot_commands() -> list[str]:
    """Every AOT command of the docs, once each (README and the config docstrings repeat some)."""
    _, _, readme = readme_commands()
    docs = readme + tpu_readme_commands() + [c for cmds in config_commands().values() for c in cmds]
    return sorted({" ".join(c.split()) for c in docs if AOT.match(c)})


COMMANDS = documented_aot_commands()


def _expected_compiles(command: str) -> int:
    """How many memory lines the command's report has: compile_all one per variant, aot_decode one per weight type."""
    tool = AOT.match(command).group(1)
    if tool == "tools/aot_decode.py":
        return len(re.search(r"--weights((?: [a-z0-9]+)+)", command).group(1).split()) \
            if "--weights" in command else 3
    if tool == "tpu/compile_all.py":
        only = re.findall(r"--only (\S+)", command)
        return len(compile_all.entries(only or None))
    return 1


def test_the_docs_show_the_aot_commands():
    tools = {AOT.match(c).group(1) for c in COMMANDS}
    assert tools == set(MEMORY_LINE), COMMANDS
    assert FAST <= set(COMMANDS), f"a make-test command is no longer documented: {FAST - set(COMMANDS)}"
    assert any("--slices" in c for c in COMMANDS) and any("configs/tpu/" in c for c in COMMANDS)
    assert len(COMMANDS) >= 12, COMMANDS


@pytest.mark.parametrize("preset", ["deepseek_vl_7b", "deepseek_vl_1p3b"])
def test_the_dry_run_model_has_the_real_layout(preset):
    real = C.preset(preset).replace(dtype="bfloat16", remat_policy="dots_no_batch", remat_policy_sam="full",
                                    sam_attention_impl="blockwise", quantization="int8")
    small = tiny_model_like(real)
    assert (small.sam is None) == (real.sam is None) and small.adapter == real.adapter
    for key in ("dtype", "param_dtype", "remat_policy", "remat_policy_sam", "remat_policy_siglip", "remat_policy_llm",
                "sam_attention_impl", "quantization", "unused_hybrid_norms", "token_merge"):
        assert getattr(small, key) == getattr(real, key), key
    assert small.text.num_key_value_heads == small.text.num_attention_heads  # both released sizes are multi-head
    assert small.text.hidden_size < 100 and small.siglip.image_size < 100


def test_a_dry_run_checks_the_arguments_as_a_real_run_does(capsys):
    """The config's batch is checked against the real mesh before anything is shrunk."""
    stage2 = os.path.join(ROOT, "configs", "deepseek_vl_7b.py") + ":stage2"
    with pytest.raises(SystemExit, match=r"--batch 6 is not divisible by data x fsdp \(4\)"):
        aot.main(["--config", stage2, "--topology", "v5p:2x2x1", "--batch", "6", "--dry-run"])
    with pytest.raises(SystemExit, match="--topology"):
        aot.main(["--config", stage2, "--topology", "v9z:2x2", "--dry-run"])
    with pytest.raises(SystemExit, match="--only v5p_65"):
        compile_all.main(["--only", "v5p_65", "--dry-run"])


def _run_dry(commands: list[str], tmp_path) -> list[dict]:
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    r = subprocess.run([sys.executable, "-m", "tests.helpers.run_tool_mains", str(out)]
                       + [c + " --dry-run" for c in commands], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0 and out.exists(), r.stderr[-4000:]
    results = json.loads(out.read_text())
    assert [x["command"] for x in results] == [c + " --dry-run" for c in commands], r.stderr[-4000:]
    return results


def _check(result: dict):
    command, out = result["command"], result["output"]
    assert result["rc"] == 0, f"{command}: exit {result['rc']}\n{out[-4000:]}"
    assert "Traceback (most recent call last)" not in out, out[-4000:]
    assert DRY_RUN_BANNER in out, f"{command}: no dry-run banner\n{out[-2000:]}"
    tool = AOT.match(command).group(1)
    lines = re.findall(MEMORY_LINE[tool], out, re.M)
    assert len(lines) == _expected_compiles(command), f"{command}: memory lines\n{out[-3000:]}"


def test_documented_aot_commands_run_dry(tmp_path):
    for result in _run_dry(sorted(FAST), tmp_path):
        _check(result)


@pytest.mark.heavy
def test_documented_aot_commands_run_dry_all(tmp_path):
    results = _run_dry([c for c in COMMANDS if c not in FAST], tmp_path)
    for result in results:
        _check(result)
    print("\n".join(f"{r['seconds']:6.1f} s  {r['command']}" for r in results))
