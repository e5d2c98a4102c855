"""Documentation that does not run is a defect: every command in README.md and in the config files' docstrings
is run here, or is named in `ELSEWHERE` with the test that runs the same entry point.

- The README's first run (its first bash block, then its Python block) runs exactly as written, in a scratch
  folder that sees the repository's `configs/`, with the installed console scripts on PATH.
- The configs' `dsvl-train` lines for the released sizes are loaded with their own overrides (placeholders
  replaced by the first run's tokenizer and sources) and must pass `validate.check`: the command is complete.
- The configs' `tpu/launch.py` lines run with `--dry-run`, and so do tpu/README.md's; every other command of
  tpu/README.md must match a row of `ELSEWHERE` as README.md's do.
- Every other command must match a row of `ELSEWHERE`, whose test file must exist: a new command in the docs
  fails this test until something runs it.
"""
from __future__ import annotations

import ast
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:make|python3?|pytest|dsvl-[a-z]+)\b")

# (pattern, where it runs) for the commands this file does not run itself.
ELSEWHERE = [
    (r"^make test(-heavy)?( PYTEST_WORKERS=\d+)?$", "CI: .ci/run is `make test`; tests/test_markers.py checks both targets' selection"),
    (r"^make demo", "tests/test_demo.py runs `python -m dsvl_jax.demo --quick`, what `make demo` runs"),
    (r"^pytest tests/(\S+\.py)", "CI: the named file is part of `make test`"),
    (r"^python -m dsvl_jax\.demo\.probe", "tests/test_vision_probe.py"),
    (r"^python -m dsvl_jax\.demo\.diagnose", "tests/test_demo.py"),
    (r"^python3? benchmarks/device_check\.py", "tests/test_device_check.py (--dry-run)"),
    (r"^python3? benchmarks/", "tests/test_benchmarks_dry_run.py (the same command with --dry-run: tiny shapes)"),
    (r"^python tools/aot_compile\.py", "tests/test_aot_docs_dry_run.py (the same command with --dry-run)"),
    (r"^python tools/aot_decode\.py", "tests/test_aot_docs_dry_run.py (the same command with --dry-run)"),
    (r"^python tpu/compile_all\.py", "tests/test_aot_docs_dry_run.py (the same command with --dry-run)"),
    (r"^python tpu/local_cluster\.py", "tests/test_multiprocess.py"),
    (r"^python tpu/launch\.py \.\.\. ", "a synopsis in prose; tpu/README.md's concrete launch lines run with --dry-run"),
    (r"^python -m dsvl_jax\.eval\.suite_tsv", "tests/test_eval_cli.py"),
    (r"^dsvl-eval ", "tests/test_eval_cli.py; the first run calls dsvl-eval"),
    (r"^dsvl-serve ", "tests/test_serve.py"),
    (r"^python -m dsvl_jax\.serve", "tests/test_serve.py"),
    (r"^dsvl-(train|convert|chat|data) ", "synopsis of a tool the first run calls; tests/test_cli_*.py"),
    (r"^dsvl-train --help$", "tests/test_cli_train.py"),
    (r"^(OPENAI_API_BASE=\S+ )?.*python (-m lmms_eval|run\.py)", "external: lmms-eval / VLMEvalKit, not ours"),
    (r"^python -m dsvl_jax\.demo\b", "tests/test_demo.py"),
]
FIRST_RUN_CWD_LINKS = ("configs",)


def _join_continuations(lines):
    out, cur = [], ""
    for line in lines:
        cur += line.strip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        out.append(cur)
        cur = ""
    return out


def _strip_comment(line: str) -> str:
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip()


def _blocks(text: str):
    """(language, body) of each fenced block."""
    return re.findall(r"^ *```(\w*)\n(.*?)^ *```", text, re.M | re.S)


def _spans(text: str):
    """Inline code spans outside fenced blocks, table pipes unescaped."""
    outside = re.sub(r"^ *```.*?^ *```", "", text, flags=re.M | re.S)
    return [s.replace("\\|", "|") for s in re.findall(r"`([^`\n]+)`", outside)]


def readme_commands() -> tuple[list[str], str, list[str]]:
    """(the first bash block's commands, the first python block, every other command)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = _blocks(text)
    first_bash = next(i for i, (lang, _) in enumerate(blocks) if lang == "bash" and "dsvl-train" in _)
    first_python = next(body for lang, body in blocks if lang == "python")
    run = [_strip_comment(c) for c in _join_continuations(blocks[first_bash][1].splitlines())]
    others = []
    for i, (lang, body) in enumerate(blocks):
        if lang == "bash" and i != first_bash:
            others += [_strip_comment(c) for c in _join_continuations(body.splitlines())]
    others += [s for s in _spans(text) if " " in s]  # a bare tool name in prose is a name, not a command
    return [c for c in run if c], first_python, [c for c in others if COMMAND.match(c)]


def tpu_readme_commands() -> list[str]:
    """The commands of tpu/README.md: its bash blocks and inline spans (tests/test_aot_docs_dry_run.py runs the
    AOT ones)."""
    text = open(os.path.join(ROOT, "tpu", "README.md"), encoding="utf-8").read()
    cmds = [_strip_comment(c) for lang, body in _blocks(text) if lang == "bash"
            for c in _join_continuations(body.splitlines())]
    return [c for c in cmds + [s for s in _spans(text) if " " in s] if COMMAND.match(c)]


def config_commands() -> dict[str, list[str]]:
    """config file → the commands its docstring shows (indented lines and inline spans)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)):
        doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read())) or ""
        lines = [line for line in doc.splitlines() if line.startswith("    ")]
        cmds = [_strip_comment(c) for c in _join_continuations(lines) if COMMAND.match(c)] + \
               [s for s in _spans(doc) if COMMAND.match(s) and " " in s]
        out[os.path.relpath(path, ROOT)] = cmds
    return out


def _where(cmd: str) -> str | None:
    return next((where for pattern, where in ELSEWHERE if re.search(pattern, cmd)), None)


def _env():
    bin_dir = os.path.dirname(sys.executable)  # the venv's console scripts (dsvl-train, ...)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _sh(cmd: str, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The README's first run, each command as written, in a scratch folder; returns that folder."""
    cwd = tmp_path_factory.mktemp("first_run")
    for name in FIRST_RUN_CWD_LINKS:
        os.symlink(os.path.join(ROOT, name), cwd / name)
    commands, python_block, _ = readme_commands()
    for cmd in commands:
        r = _sh(cmd, cwd)
        assert r.returncode == 0, f"README command failed: {cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return cwd


def test_harvest_finds_the_commands_the_docs_show():
    commands, python_block, others = readme_commands()
    tools = {c.split()[0] for c in commands}
    assert {"dsvl-train", "dsvl-chat", "dsvl-convert", "dsvl-eval", "dsvl-data", "python"} <= tools
    assert "load_pretrained" in python_block and "generate" in python_block
    assert any(c.startswith("make demo") for c in others)
    assert any(c.startswith("dsvl-train") for cmds in config_commands().values() for c in cmds)


def test_the_first_run_and_the_python_example_run_as_written(first_run):
    _, python_block, _ = readme_commands()
    (first_run / "example.py").write_text(python_block)
    r = subprocess.run([sys.executable, "example.py"], cwd=first_run, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(first_run / "runs" / "tiny-official" / "model.safetensors")
    assert os.path.isfile(first_run / "runs" / "tiny-hf" / "processor_config.json")


def test_every_other_readme_command_is_run_by_a_named_test():
    _, _, others = readme_commands()
    missing = [c for c in others if _where(c) is None]
    assert not missing, "README commands that nothing runs (run them, or name their test in ELSEWHERE):\n" + \
        "\n".join(missing)
    for _, where in ELSEWHERE:
        for path in re.findall(r"tests/\w+\.py", where):
            assert os.path.isfile(os.path.join(ROOT, path)), f"ELSEWHERE names {path}, which does not exist"
    for c in others:
        m = re.match(r"^pytest (tests/\S+\.py)", c)
        if m:
            assert os.path.isfile(os.path.join(ROOT, m.group(1))), c


def _overrides(cmd: str) -> dict[str, str]:
    return dict(a[len("--config."):].split("=", 1) for a in shlex.split(cmd) if a.startswith("--config."))


def test_config_docstring_train_commands_are_complete(first_run):
    """Each `dsvl-train` line of a config docstring, its placeholders (`...`, `'[...]'`, gs://BUCKET) replaced by
    the first run's data, loads and passes validate.check: nothing a run needs is left unsaid."""
    from dsvl_jax.train.config_files import load_config
    from dsvl_jax.train.validate import check

    tokenizer = str(first_run / "runs" / "data" / "tokenizer.json")
    sources = (first_run / "runs" / "data" / "sources.json").read_text().replace("runs/", f"{first_run}/runs/")
    checked = 0
    for path, cmds in config_commands().items():
        for cmd in cmds:
            if not cmd.startswith("dsvl-train"):
                continue
            if "configs/tiny.py" in cmd:  # the tiny config's lines are the README's first run, word for word
                assert cmd in readme_commands()[0], cmd
                continue
            spec = shlex.split(cmd)[shlex.split(cmd).index("--config") + 1]
            c = load_config(os.path.join(ROOT, spec))
            given = _overrides(cmd)
            flat = {}
            for key, value in given.items():
                if key == "init.from_checkpoint":
                    continue  # an earlier stage's output; its existence is checked when the run starts
                value = {"...": tokenizer, "[...]": sources}.get(value, value)
                old = c
                for part in key.split(".")[:-1]:
                    old = old[part]
                flat[key] = type(old[key.split(".")[-1]])(value)
            if "init.from_checkpoint" not in given:  # stage-1 lines must name the data themselves
                assert {"data.tokenizer", "data.sources_json"} <= set(given), f"{path}: {cmd}"
            else:  # later stages inherit the data flags of the stage-1 line above them
                flat.setdefault("data.tokenizer", tokenizer)
                flat.setdefault("data.sources_json", sources)
            c.update_from_flattened_dict(flat)
            m = c.mesh
            devices = max(1, m.data) * max(1, m.fsdp) * max(1, m.tensor) * c.get("grad_accum", 1)
            check(c, device_count=devices)
            checked += 1
    assert checked >= 4


def test_tpu_readme_commands_run_or_are_named():
    """tpu/README.md: each concrete `python tpu/launch.py` line prints its gcloud commands under --dry-run; every
    other command is run by the test `ELSEWHERE` names."""
    ran = 0
    for cmd in tpu_readme_commands():
        if cmd.startswith("python tpu/launch.py") and " ... " not in cmd:
            dry = cmd.replace("python tpu/launch.py", f"{sys.executable} tpu/launch.py --dry-run", 1)
            r = subprocess.run(["bash", "-c", dry], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
            assert r.returncode == 0 and "gcloud" in r.stdout, f"tpu/README.md: {dry}\n{r.stdout[-1000:]}{r.stderr[-2000:]}"
            ran += 1
        else:
            assert _where(cmd), f"tpu/README.md: nothing runs `{cmd}` (run it, or name its test in ELSEWHERE)"
    assert ran >= 5


def test_config_docstring_launch_commands_dry_run(tmp_path):
    ran = 0
    for path, cmds in config_commands().items():
        for cmd in cmds:
            if not cmd.startswith("python tpu/launch.py"):
                if not cmd.startswith("dsvl-train"):
                    assert cmd in readme_commands()[0] or _where(cmd), f"{path}: nothing runs `{cmd}`"
                continue
            dry = cmd.replace("python tpu/launch.py", f"{sys.executable} tpu/launch.py --dry-run", 1)
            r = subprocess.run(["bash", "-c", dry], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, f"{path}: {dry}\n{r.stderr[-2000:]}"
            assert "gcloud" in r.stdout, r.stdout[-2000:]
            ran += 1
    assert ran >= 5
