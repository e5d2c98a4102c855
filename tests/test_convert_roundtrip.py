"""Bit-exact round trips through every conversion direction (tensor names, shapes, dtypes and bytes),
dtype handling (bf16 stays bf16, fp32 stays fp32, --dtype converts) and sharded output.

Sources: transformers' own `save_pretrained` of its DeepSeek-VL port with randomised weights (so the HF
side is not ours), our exports of it, and params born in our model (`init` + noise)."""
import json
import os

import numpy as np
import pytest
import torch
from flax import traverse_util

from dsvl_jax import config as C
from dsvl_jax.convert import orbax_io
from dsvl_jax.convert.cli import main as cli
from dsvl_jax.convert.export import save_pretrained
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.convert.safetensors_io import SafetensorsReader
from tests.helpers import torch_ref as R


def tensors(folder):
    r = SafetensorsReader(folder)
    return {k: r.get(k) for k in r.keys()}


def assert_same_tensors(a_dir, b_dir):
    a, b = tensors(a_dir), tensors(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k].shape, a[k].dtype) == (b[k].shape, b[k].dtype), k
        assert a[k].tobytes() == b[k].tobytes(), k


def flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def assert_same_params(a, b):
    a, b = flat(a), flat(b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k].shape, a[k].dtype) == (b[k].shape, b[k].dtype), k
        assert a[k].tobytes() == b[k].tobytes(), k


def our_params(cfg, dtype, seed=0):
    """Params shaped by our model (`jax.eval_shape` of its init, in `dtype`) with random values: norms
    near 1, everything else (hd alpha, rel-pos tables, biases) away from zero."""
    import jax.numpy as jnp
    from dsvl_jax.state import param_shapes
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    rng = np.random.default_rng(seed)
    out = {}
    for p, s in param_shapes(cfg).items():
        x = rng.standard_normal(s.shape, np.float32) * 0.05 + (1.0 if p.endswith("/scale") else 0.0)
        out[p] = jnp.asarray(x, dtype)
    return cfg, traverse_util.unflatten_dict(out, sep="/")


CASES = {  # name: (config, torch dtype of the transformers-written source)
    "hybrid_bf16": (C.tiny(), torch.bfloat16),
    "siglip_tied_fp32": (C.tiny(hybrid=False, tie_word_embeddings=True), torch.float32),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_dir(request, tmp_path_factory):
    cfg, dt = CASES[request.param]
    path = str(tmp_path_factory.mktemp(request.param) / "hf")
    R.hf_model(cfg, seed=3).to(dt).save_pretrained(path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:  # a side file that must travel
        json.dump({"model_max_length": 512}, f)
    return cfg, dt, path


def test_hf_ours_hf_is_bit_exact(hf_dir, tmp_path):
    _, _, src = hf_dir
    out = save_pretrained(load_pretrained(src), str(tmp_path / "hf"), layout="hf")
    assert_same_tensors(src, out)
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))


def test_official_ours_official_is_bit_exact(hf_dir, tmp_path):
    _, _, src = hf_dir
    official = str(tmp_path / "official")
    assert cli([src, official, "--to", "official"]) == 0
    out = save_pretrained(load_pretrained(official), str(tmp_path / "official2"), layout="official")
    assert_same_tensors(official, out)
    with open(os.path.join(official, "config.json")) as f, open(os.path.join(out, "config.json")) as g:
        assert json.load(f) == json.load(g)


def test_streaming_paths_are_bit_exact_and_agree_with_the_param_path(hf_dir, tmp_path):
    """CLI HF → official → HF (tensor by tensor, no param tree) gives back the source; its official output
    equals the one written from loaded params (both directions of one table)."""
    _, _, src = hf_dir
    off, back = str(tmp_path / "off"), str(tmp_path / "back")
    assert cli([src, off, "--to", "official"]) == 0
    assert cli([off, back, "--to", "hf"]) == 0
    assert_same_tensors(src, back)
    via_params = save_pretrained(load_pretrained(src), str(tmp_path / "off_params"), layout="official")
    assert_same_tensors(off, via_params)
    assert os.path.isfile(os.path.join(back, "tokenizer_config.json"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ours_hf_ours_gives_identical_params(dtype, tmp_path):
    cfg, params = our_params(C.tiny(), dtype)
    out = save_pretrained((cfg, params), str(tmp_path / "hf"), layout="hf")
    back = load_pretrained(out)
    assert_same_params(params, back.params)
    assert back.config == cfg


def test_orbax_hf_orbax_is_bit_exact(tmp_path):
    cfg, params = our_params(C.tiny(hybrid=False), "bfloat16", seed=4)
    orbax_io.save_orbax_params(str(tmp_path / "run"), cfg, params, step=7)
    assert cli([str(tmp_path / "run"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert cli([str(tmp_path / "hf"), str(tmp_path / "run2"), "--to", "orbax"]) == 0
    cfg2, params2 = orbax_io.load_orbax_params(str(tmp_path / "run2"))
    assert_same_params(params, params2)
    assert cfg2 == cfg
    # ...and Orbax → official → Orbax through the other layout.
    assert cli([str(tmp_path / "run"), str(tmp_path / "off"), "--to", "official"]) == 0
    assert cli([str(tmp_path / "off"), str(tmp_path / "run3"), "--to", "orbax"]) == 0
    assert_same_params(params, orbax_io.load_orbax_params(str(tmp_path / "run3"))[1])


def test_official_hybrid_carries_the_unused_layernorms(tmp_path):
    """The official HybridVisionTower always builds high/low_layer_norm: an HF-port source (which has none)
    gets nn.LayerNorm's initial values; an official source keeps its own values through ours and back."""
    cfg = C.tiny()
    src = str(tmp_path / "hf")
    R.hf_model(cfg, seed=1).save_pretrained(src)
    off = str(tmp_path / "off")
    assert cli([src, off, "--to", "official"]) == 0
    t = tensors(off)
    for name, width in (("high", 4 * cfg.sam.output_channels), ("low", cfg.siglip.hidden_size)):
        np.testing.assert_array_equal(t[f"vision_model.{name}_layer_norm.weight"], np.ones(width, np.float32))
        np.testing.assert_array_equal(t[f"vision_model.{name}_layer_norm.bias"], np.zeros(width, np.float32))
    # An official checkpoint whose norms hold other values: they survive official → ours → official.
    vlm = load_pretrained(off)
    assert vlm.config.unused_hybrid_norms
    p = traverse_util.flatten_dict(vlm.params, sep="/")
    p["vision/high_layer_norm/scale"] = p["vision/high_layer_norm/scale"] * 3
    edited = save_pretrained((vlm.config, traverse_util.unflatten_dict(p, sep="/")), str(tmp_path / "off2"),
                             layout="official")
    again = save_pretrained(load_pretrained(edited), str(tmp_path / "off3"), layout="official")
    assert_same_tensors(edited, again)
    assert tensors(again)["vision_model.high_layer_norm.weight"][0] == 3.0


def test_dtypes_kept_unless_asked(hf_dir, tmp_path):
    """bf16 stays bf16 and fp32 stays fp32 in every output; --dtype converts with torch's rounding."""
    cfg, dt, src = hf_dir
    code = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dt]
    for to in ("official", "orbax"):
        assert cli([src, str(tmp_path / to), "--to", to]) == 0
    assert {a.dtype.name for a in tensors(str(tmp_path / "official")).values()} == {code}
    cfg_o, params_o = orbax_io.load_orbax_params(str(tmp_path / "orbax"))
    assert {a.dtype.name for a in flat(params_o).values()} == {code}
    assert cfg_o.param_dtype == code
    assert {a.dtype.name for a in flat(load_pretrained(src).params).values()} == {code}

    other = "float32" if code == "bfloat16" else "bfloat16"
    conv = str(tmp_path / f"hf_{other}")
    assert cli([src, conv, "--to", "hf", "--dtype", other]) == 0
    ref = R.hf_model(cfg, seed=3).to(dt).to(getattr(torch, other)).state_dict()
    got = tensors(conv)
    assert {a.dtype.name for a in got.values()} == {other}
    for k, a in got.items():  # bit for bit what torch's own cast gives
        assert a.tobytes() == ref[k].contiguous().view(torch.uint8 if other == "bfloat16" else torch.float32
                                                       ).numpy().tobytes(), k
    with open(os.path.join(conv, "config.json")) as f:
        assert json.load(f)["dtype"] == other


def test_sharded_output_has_an_index_and_loads(tmp_path):
    cfg = C.tiny()
    src = str(tmp_path / "hf")
    model = R.hf_model(cfg, seed=2)
    model.save_pretrained(src)
    out = str(tmp_path / "sharded")
    assert cli([src, out, "--to", "hf", "--max-shard-size", "200KB"]) == 0
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert all(os.path.getsize(os.path.join(out, f)) <= 200_000 + 16_384 for f in shards)  # + header
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors(src).values())
    assert_same_tensors(src, out)
    from transformers import DeepseekVLHybridForConditionalGeneration
    loaded, info = DeepseekVLHybridForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    sd = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
