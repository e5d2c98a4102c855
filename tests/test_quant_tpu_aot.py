"""tools/aot_decode.py on the tiny config for a v5e slice: int8 weights stay int8 in the compiled decode step
(s8 parameters, no float copy of their shapes outside a fusion) and take fewer bytes per chip than fp32.
Skips when libtpu is absent."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.heavy,
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_int8_decode_step_keeps_int8_weights_on_v5e():
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "aot_decode.py"), "--preset", "tiny",
                          "--topology", "v5e:2x2", "--tensor", "2", "--slots", "128", "--weights", "fp32", "int8"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    pattern = (r"^\s+(fp32|int8)\s+arguments per chip\s+([\d.]+) MiB.*int8 params in HBM: (\d+), "
               r"float copies of their shapes in the program: (\d+)$")
    rows = {m[0]: m[1:] for m in re.findall(pattern, out.stdout, re.M)}
    assert set(rows) == {"fp32", "int8"}, out.stdout
    assert rows["fp32"][1] == "0" and int(rows["int8"][1]) == 8  # 7 stacked layer linears + lm_head
    assert rows["int8"][2] == "0"
    assert float(rows["int8"][0]) < float(rows["fp32"][0])
