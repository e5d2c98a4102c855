"""Repository scripts that are files, not package modules (tools/*.py), loaded for tests."""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.cache
def aot_tool():
    """tools/aot_compile.py as a module (its config loader, abstract state / batch builders, main)."""
    spec = importlib.util.spec_from_file_location("aot_compile", os.path.join(ROOT, "tools", "aot_compile.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
