"""Bad checkpoints give a clear error that names the key or the file — never a crash deep inside JAX."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dsvl_jax import config as C
from dsvl_jax.convert.config_io import ConfigError
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.convert.safetensors_io import CheckpointError
from tests.helpers import torch_ref as R


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("good"))
    R.save_hf(R.hf_model(C.tiny(), seed=1), path)
    return path


@pytest.fixture
def bad(good, tmp_path):
    dst = str(tmp_path / "ckpt")
    shutil.copytree(good, dst)
    return dst


def _edit(path, fn):
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


KEY = "model.language_model.layers.1.self_attn.k_proj.weight"


def test_missing_key_is_named(bad):
    _edit(bad, lambda t: t.pop(KEY))
    with pytest.raises(CheckpointError, match="missing.*" + KEY.replace(".", r"\.")):
        load_pretrained(bad)


def test_wrong_shape_is_named(bad):
    _edit(bad, lambda t: t.__setitem__(KEY, np.zeros((3, 64), np.float32)))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape \(3, 64\).*needs \(32, 64\)"):
        load_pretrained(bad)


def test_wrong_dtype_is_named(bad):
    _edit(bad, lambda t: t.__setitem__(KEY, np.zeros((32, 64), np.int64)))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*dtype I64"):
        load_pretrained(bad)


def test_unexpected_key_is_named(bad):
    _edit(bad, lambda t: t.__setitem__("model.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.extra\.weight"):
        load_pretrained(bad)


def test_truncated_safetensors_names_the_file(bad):
    f = os.path.join(bad, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_pretrained(bad)


def test_garbage_safetensors_names_the_file(bad):
    with open(os.path.join(bad, "model.safetensors"), "wb") as fh:
        fh.write(b"\x00" * 7)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_pretrained(bad)


def test_unknown_model_type_names_the_file(bad):
    cfg_path = os.path.join(bad, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"] = "llava"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ConfigError, match=r"config\.json.*unknown model_type 'llava'"):
        load_pretrained(bad)


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is empty"):
        load_pretrained(str(tmp_path))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope"))


def test_config_without_weights(bad):
    os.remove(os.path.join(bad, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_pretrained(bad)


def test_shard_index_pointing_outside_is_refused(bad):
    json.dump({"weight_map": {KEY: "../../etc/passwd"}},
              open(os.path.join(bad, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_pretrained(bad)
