"""Per-module parity with transformers, so that a failure points at a module: SigLIP tower, SAM branch
(necks, resize, stride-2 convs, hd path), aligner, decoder — on tiny configs and at real width."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dsvl_jax import config as C
from dsvl_jax.convert.load import load_pretrained
from tests.helpers import torch_ref as R

TOL = 1e-4


def _load(cfg, tmp_path, seed=0):
    model = R.hf_model(cfg, seed=seed)
    R.save_hf(model, str(tmp_path))
    return model, load_pretrained(str(tmp_path))


def _apply(vlm, fn, *args):
    return np.asarray(vlm.module.apply({"params": vlm.params}, *args, method=fn))


def check_siglip(model, vlm, seed=0):
    pv, hv = R.image_batch(vlm.config, 2, seed)
    with torch.no_grad():
        ref = model.model.vision_model(torch.from_numpy(pv)).last_hidden_state.numpy()
    ours = _apply(vlm, lambda m, a: m.vision.encode_low(a), jnp.asarray(pv))
    return np.abs(ours - ref).max()


def check_sam(model, vlm, seed=0):
    pv, hv = R.image_batch(vlm.config, 2, seed)
    with torch.no_grad():
        ref = model.model.get_high_res_image_features(torch.from_numpy(hv)).last_hidden_state.numpy()
    ours = _apply(vlm, lambda m, b: m.vision.encode_high(b), jnp.asarray(hv))
    return np.abs(ours - ref).max()


def check_aligner(model, vlm, seed=0):
    cfg = vlm.config
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((2, cfg.siglip.num_patches, cfg.siglip.hidden_size)).astype(np.float32)
    with torch.no_grad():
        if cfg.is_hybrid:
            high = rng.standard_normal((2, cfg.siglip.num_patches, 4 * cfg.sam.output_channels)).astype(np.float32)
            ref = model.model.aligner(torch.from_numpy(low), torch.from_numpy(high)).numpy()
            ours = _apply(vlm, lambda m, a, b: m.aligner(a, b), jnp.asarray(low), jnp.asarray(high))
        else:
            ref = model.model.aligner(torch.from_numpy(low)).numpy()
            ours = _apply(vlm, lambda m, a: m.aligner(a), jnp.asarray(low))
    return np.abs(ours - ref).max()


def check_decoder(model, vlm, seed=0, length=11):
    from dsvl_jax.models.llama import causal_mask
    cfg = vlm.config
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.text.vocab_size, size=(2, length))
    with torch.no_grad():
        h = model.model.language_model(input_ids=torch.from_numpy(ids)).last_hidden_state
        ref = model.lm_head(h).numpy()
    pos = jnp.broadcast_to(jnp.arange(length), (2, length))
    ours = _apply(vlm, lambda m, i: m.language_model(i, pos, causal_mask(2, length)), jnp.asarray(ids))
    return np.abs(ours - ref).max()


@pytest.fixture(scope="module", params=["hybrid", "siglip_only"])
def tiny_pair(request, tmp_path_factory):
    cfg = C.tiny(hybrid=request.param == "hybrid")
    return _load(cfg, tmp_path_factory.mktemp(request.param), seed=11)


def test_siglip_tower(tiny_pair):
    assert check_siglip(*tiny_pair) <= TOL


def test_sam_branch_with_hd_path(tiny_pair):
    if not tiny_pair[1].config.is_hybrid:
        pytest.skip("no SAM tower in the 1.3B layout")
    assert check_sam(*tiny_pair) <= TOL


def test_aligner(tiny_pair):
    assert check_aligner(*tiny_pair) <= TOL


def test_decoder(tiny_pair):
    assert check_decoder(*tiny_pair) <= TOL


# ---- real width: one layer (two for SAM: a windowed and a global block) of each part ----
def _real_width_cfg():
    tiny = C.tiny()
    return tiny.replace(
        siglip=C.SiglipConfig(num_hidden_layers=1),  # 1024 wide, 16 heads, 384 px
        sam=C.SamConfig(num_hidden_layers=2, global_attn_indexes=(1,)),  # 768/12 heads, 1024 px, window 14
        text=dataclasses.replace(C.TextConfig(), num_hidden_layers=1, vocab_size=1024, max_position_embeddings=64),
        image_token_id=1023)


@pytest.fixture(scope="module")
def real_width(tmp_path_factory):
    return _load(_real_width_cfg(), tmp_path_factory.mktemp("real_width"), seed=3)


@pytest.mark.slow
def test_real_width_siglip_layer(real_width):
    assert check_siglip(*real_width) <= TOL


@pytest.mark.slow
def test_real_width_sam_windowed_and_global_blocks(real_width):
    assert check_sam(*real_width) <= TOL


@pytest.mark.slow
def test_real_width_aligner_and_decoder_layer(real_width):
    assert check_aligner(*real_width) <= TOL
    assert check_decoder(*real_width) <= TOL
