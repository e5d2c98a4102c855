"""Bad training configs fail before anything compiles, with a message naming the key; shipped configs load."""
import glob
import importlib.util
import os

import pytest

from dsvl_jax.train.trainer import train
from dsvl_jax.train.validate import ConfigError, check
from tests.helpers.train_fixtures import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bad(corpus, **kw):
    return tiny_config("stage1", corpus[0], corpus[1], **kw)


@pytest.mark.parametrize("overrides,message", [
    ({"mesh.data": 3}, r"mesh data=3 .* does not divide the 8 devices"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, r"does not divide the 8 devices"),
    ({"batch_size": 6}, r"batch_size=6 is not divisible by data×fsdp=8"),
    ({"grad_accum": 3}, r"batch_size=8 is not divisible by data×fsdp=8 × grad_accum=3"),
    ({"stage": 4}, r"config.stage=4"),
    ({"trainable": ("sam/nothing_here",)}, r"trains nothing|match no"),
    ({"init.from_checkpoint": "/nonexistent/stage1"}, r"init.from_checkpoint='/nonexistent/stage1' does not exist"),
    ({"data.tokenizer": "/nonexistent/tok.json"}, r"tokenizer='/nonexistent/tok.json' does not exist"),
    ({"seq_len": 100000}, r"seq_len=100000 exceeds the model context"),
    ({"data.sources": []}, r"data.sources is empty"),
    ({"stop_at_step": 101}, r"stop_at_step=101 must be in 0..config.total_steps=100"),
    ({"log_every": 0}, r"log_every=0 must be positive"),
    ({"data.max_skips_in_a_row": -1}, r"max_skips_in_a_row=-1 must be >= 0"),
    ({"data.sources": [{"name": "x", "paths": "/nonexistent/x-*.array_record"}]},
     r"config.data.sources: no ArrayRecord shards at '/nonexistent/x-\*.array_record'"),
])
def test_bad_config_is_rejected_before_compiling(corpus, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(_bad(corpus, **overrides), str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd" / "checkpoints")


def test_unknown_key_is_rejected(corpus):
    c = _bad(corpus)
    c.optimizer.lrr = 1.0
    with pytest.raises(ConfigError, match=r"unknown config keys: \['optimizer.lrr'\]"):
        check(c)


def test_stage_that_trains_nothing(corpus):
    c = _bad(corpus, trainable=("sam",), **{"model.sam": None, "model.adapter": "mlp_gelu"})
    with pytest.raises(ConfigError, match="trains nothing"):
        check(c)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_shipped_configs_load_and_validate(path, corpus):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for variant in ("stage1", "stage2", "stage3"):
        c = mod.get_config(variant)
        c.data.sources, c.data.tokenizer = corpus
        devices = 8 if "tiny" in path else 256  # the real configs are for pods: validate the mesh for 256 chips
        check(c, device_count=devices)


def test_sources_from_the_command_line_as_json(corpus):
    import json
    from dsvl_jax.train.validate import sources
    c = _bad(corpus, **{"data.sources": []})
    c.data.sources_json = json.dumps(corpus[0])
    check(c)
    assert sources(c) == corpus[0]
    c.data.sources_json = "[{not json"
    with pytest.raises(ConfigError, match="sources_json is not valid JSON"):
        check(c)
