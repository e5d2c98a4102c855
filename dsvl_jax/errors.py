"""The errors callers catch, in one place (no project imports: every layer can raise them).

All are `ValueError`s, raised before anything compiles or is written, with a message that names the
file, key or argument at fault:

- `InputError`: model inputs that do not fit the config (`VLM.__call__`, `VLM.generate`, `pack_batch`);
- `ConfigError`: a config that cannot work: a checkpoint's config.json or a training config;
- `CheckpointError`: a checkpoint folder or file that cannot be read, or params that do not fit a config;
- `UsageError`: a command-line argument a CLI refuses (one line on stderr, exit status 2).
"""
from __future__ import annotations


class InputError(ValueError):
    """Inputs that do not fit the model; raised before anything compiles."""


class ConfigError(ValueError):
    """A model config (config.json) or training config (ml_collections) that cannot work; names the key."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and key."""


class UsageError(ValueError):
    """A command-line argument a CLI refuses; the message names the flag."""


def require_at_least_one(args, names) -> None:
    """UsageError for the first of the integer flags `names` (argparse dests) given below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")
