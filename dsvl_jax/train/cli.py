"""`dsvl-train`: run `dsvl-train --help` for the flags, an example and the config keys set most often.

big_vision-style: the config file's `get_config(variant)` builds an ml_collections ConfigDict; any key can
be overridden on the command line. Multi-host (TPU pods): pass --distributed (or set DSVL_DISTRIBUTED=1)
and every process calls `jax.distributed.initialize()` before anything else touches JAX.

Expected failures print one line on stderr, never a traceback; exit codes: 0 done (or stopped by SIGTERM,
the step reached saved), 1 training failed (diverged, checkpoint save failed), 2 a config or input error,
130 stopped by SIGINT (Ctrl-C; the step reached saved; a second Ctrl-C stops without saving).
"""
from __future__ import annotations

import logging
import os
import re
import signal
import sys
import textwrap

import jax
from absl import app, flags
from ml_collections import config_flags

from dsvl_jax.config import VLMConfig
from dsvl_jax.data.loader import DataConfig
from dsvl_jax.errors import CheckpointError, ConfigError
from dsvl_jax.train.checkpointing import CheckpointSaveError, Interrupted
from dsvl_jax.train.config_base import base
from dsvl_jax.train.trainer import TrainingDiverged, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard logs go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", os.environ.get("DSVL_DISTRIBUTED") == "1",
                                 "Call jax.distributed.initialize() (TPU pods / multi-process).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (only off TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (only off TPU).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (only off TPU).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds without a heartbeat after which a process "
                                  "counts as dead and every other process aborts (no hang on a lost host).")
_INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for all processes to join.")

PROG = "dsvl-train"
HELP_FLAGS = ("-h", "-help", "--help", "-?", "--helpshort")
# (key, what it does): the keys a first run sets; values shown are the base config's (config files override)
COMMON_KEYS = (
    ("data.tokenizer", "tokenizer.json or sentencepiece .model (required)"),
    ("data.sources_json", "the training data (required): a JSON list of {name, paths (glob), weight, modality: "
                          "text | multimodal}; a config file sets data.sources instead"),
    ("total_steps", "steps of the run and of its learning-rate schedule"),
    ("stop_at_step", "stop and save earlier (0: at total_steps); run again to go on"),
    ("batch_size", "global batch, in rows"),
    ("seq_len", "tokens per row"),
    ("grad_accum", "micro-batches per step (fewer rows live at once)"),
    ("optimizer.lr", "peak learning rate"),
    ("mesh.data", "devices along the data axis (-1: the rest)"),
    ("mesh.fsdp", "devices the params are sharded over (-1: the rest)"),
    ("mesh.tensor", "tensor-parallel devices"),
    ("init.from_checkpoint", "start from an earlier stage's workdir"),
    ("init.from_pretrained", "start from a PyTorch checkpoint folder (HF-port or official layout)"),
    ("lora.rank", "LoRA: train adapters of this rank on lora.targets (alpha, dropout, full, from_peft beside it), "
                  "the base frozen; 0: off"),
    ("checkpoint.every", "save every N steps (SIGTERM / Ctrl-C also save)"),
    ("log_every", "metrics every N steps (console, metrics.jsonl, TensorBoard)"),
    ("benchmarks_json", "benchmarks scored during training: a JSON list of {name, format (a dsvl-eval format), "
                        "data, limit, batch, ...}; a config file sets benchmarks instead"),
    ("benchmark_every", "score the benchmarks every N steps (0: off)"),
    ("keep_best", "keep the params of the best step by this benchmark metric (e.g. suite/score) in workdir/best"),
    ("data.workers", "Grain decoding processes"),
    ("data.max_skips_in_a_row", "stop with an error when a data stream skips this many records in a row "
                                "(none fits seq_len, say); 0: no limit"),
)


def usage() -> str:
    defaults = base(VLMConfig())

    def default(key):
        node = defaults
        for part in key.split("."):
            node = node[part]
        if key == "data.max_skips_in_a_row" and node is None:
            node = DataConfig.max_skips_in_a_row  # unset in the base config: the loader's default applies
        return "" if node in ("", None, []) else str(node)

    rows = []
    for k, what in COMMON_KEYS:
        lines = textwrap.wrap(what, 72)
        rows.append(f"  {k:<24}{default(k):>7}  {lines[0]}")
        rows += [" " * 35 + ln for ln in lines[1:]]
    keys = "\n".join(rows)
    return f"""{PROG}: train DeepSeek-VL (JAX) from a config file; resumes when WORKDIR holds a checkpoint.

usage: {PROG} --config FILE.py[:VARIANT] --workdir DIR [--config.KEY=VALUE ...]

required:
  --config FILE.py[:VARIANT]  a config file and its variant: configs/tiny.py:stage1 (stage1|2|3),
                              configs/deepseek_vl_1p3b.py:stage2, configs/deepseek_vl_7b.py:stage3,
                              configs/tpu/<slice>.py:7b_stage2
  --workdir DIR               checkpoints, metrics.jsonl and TensorBoard logs; the same DIR again resumes

example (the ~1M-parameter tiny model on a CPU; record shards made with dsvl-data):
  {PROG} --config configs/tiny.py:stage1 --workdir /tmp/tiny/s1 \\
      --config.data.tokenizer=data/tokenizer.json \\
      --config.data.sources_json='[{{"name": "cap", "paths": "data/cap-*.array_record", "modality": "multimodal"}}]' \\
      --config.total_steps=200 --config.batch_size=8
(no data yet? `python -m dsvl_jax.demo` makes a corpus and trains the tiny model end to end)

config keys set most often, as --config.KEY=VALUE (any key of the config file can be set so);
the middle column is the base config's value, which config files change:
{keys}

other flags: --distributed (multi-host; --coordinator, --num_processes, --process_id off TPU),
--helpfull (every flag). Exit codes: 0 done or stopped by SIGTERM (saved), 1 training failed,
2 config or input error, 130 stopped by Ctrl-C (saved)."""


def _fail(msg: str, code: int = 2):
    """One line on stderr, then exit."""
    print(f"{PROG}: " + " ".join(str(msg).split()), file=sys.stderr)
    sys.exit(code)


def _config_arg(argv) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _innermost(e: BaseException) -> BaseException:
    # ml_collections wraps the KeyError that holds "Did you mean ..." in an AttributeError
    while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    return e


def _traceback_line(text: str) -> str:
    """The error line of a traceback embedded in a message, with where it was raised."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    where = [ln for ln in lines if ln.startswith('File "')]
    last = lines[-1]
    last = last[len("ValueError: "):] if last.startswith("ValueError: ") else last
    m = re.match(r'File "([^"]+)", line (\d+)', where[-1]) if where else None
    return f"{last} ({m.group(1)}, line {m.group(2)})" if m else last


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing with one-line errors (absl and ml_collections would print tracebacks) and our --help."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(usage())
        sys.exit(0)
    spec = _config_arg(argv)
    if spec is not None and not os.path.isfile(spec.split(":", 1)[0]):
        _fail(f"config error: --config={spec}: no such file {spec.split(':', 1)[0]!r}")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e)
        if "Traceback (most recent call last)" in text:  # the config file's get_config raised
            _fail(f"config error: --config={spec}: {_traceback_line(text)}")
        _fail(f"config error: {text} (see {PROG} --help)")
    except (AttributeError, KeyError) as e:  # --config.<unknown key>=...
        lines = [ln.strip("'\"") for ln in str(_innermost(e).args[0]).splitlines()]
        key = lines[0]
        flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.")
                     and re.search(rf"\.{re.escape(key)}(\.|=|$)", a.split("=", 1)[0] + "=")), "--config.…")
        _fail(f"config error: {flag}: unknown config key {key!r}. " + " ".join(lines[1:]))
    except Exception as e:  # anything else the config file raised while loading
        _fail(f"config error: --config={spec}: {type(e).__name__}: {e}")


def main(argv):
    del argv
    if _CONFIG.value is None or not _WORKDIR.value:
        _fail(f"--config and --workdir are required (see {PROG} --help)")
    if _DISTRIBUTED.value:
        kw = dict(heartbeat_timeout_seconds=_HEARTBEAT.value, initialization_timeout=_INIT_TIMEOUT.value)
        if _COORDINATOR.value:
            kw.update(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                      process_id=_PROCESS_ID.value)
        jax.distributed.initialize(**kw)
        print(f"{PROG}: process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} of {jax.device_count()} devices", flush=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        summary = train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointError) as e:
        _fail(f"config error: {e}")
    except (TrainingDiverged, CheckpointSaveError) as e:  # expected failures: one clear line, no traceback
        _fail(f"{type(e).__name__}: {e}", 1)
    except Interrupted as e:
        _fail(f"stopped by {signal.Signals(e.signum).name} during start-up; nothing trained, nothing saved",
              130 if e.signum == signal.SIGINT else 0)
    except KeyboardInterrupt:  # Ctrl-C a second time: no save
        _fail("stopped by a second SIGINT; the step reached was not saved", 130)
    print({k: v for k, v in summary.items() if not isinstance(v, dict)})
    if "signal" in summary:
        step, saved = summary["step"], summary["saved_step"]
        what = (f"saved checkpoint {saved} in {_WORKDIR.value}; the same command resumes" if saved is not None else
                f"checkpoint {step} in {_WORKDIR.value} holds this state; the same command resumes" if step else
                "nothing trained, nothing saved")
        _fail(f"stopped by {summary['signal']} at step {step}: {what}", 130 if summary["signal"] == "SIGINT" else 0)


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
