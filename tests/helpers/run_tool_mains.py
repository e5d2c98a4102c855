"""Run several commands of the repository's scripts in ONE process: `python -m tests.helpers.run_tool_mains
OUT.json 'python tools/aot_compile.py --config ...' ...`. Each command's script is loaded from its file once and
its `main(argv)` called with the command's arguments, as `python script args` would, so jax and libtpu load
once for all of them. Writes [{command, rc, output, seconds}] to OUT.json: rc is what the interpreter would
exit with (main's return value, SystemExit's code, 1 for an uncaught exception, whose traceback goes into
output as Python would print it).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shlex
import sys
import time
import traceback

# What the AOT scripts set before jax loads; they are loaded after this module.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_loaded: dict[str, object] = {}


def _script(path: str):
    if path not in _loaded:
        name = "_script_" + path.replace("/", "_").replace(".", "_")
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[path] = module
    return _loaded[path]


def run(command: str) -> dict:
    words = shlex.split(command)
    if words[0] not in ("python", "python3") or not words[1].endswith(".py"):
        raise ValueError(f"not a `python SCRIPT ...` command: {command!r}")
    out, t0 = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = _script(words[1]).main(words[2:])
        except SystemExit as e:
            rc = e.code
        except BaseException:  # what the interpreter would print and exit 1 with
            traceback.print_exc()
            rc = 1
    if isinstance(rc, str):  # SystemExit("message"): printed to stderr, exit status 1
        out.write(rc + "\n")
        rc = 1
    return dict(command=command, rc=rc or 0, output=out.getvalue(), seconds=time.perf_counter() - t0)


def main(argv: list[str]) -> int:
    results = []
    for command in argv[1:]:
        results.append(run(command))
        with open(argv[0], "w") as f:  # after each command: a later crash still leaves the earlier results
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
