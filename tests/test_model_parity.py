"""Logit parity with transformers' DeepseekVL(Hybrid)ForConditionalGeneration, through save_pretrained →
load_pretrained, in float32 at a fixed 1e-4 max |Δlogit| (HF-port and official layouts)."""
import numpy as np
import pytest

from dsvl_jax import config as C
from dsvl_jax.convert.export import save_pretrained
from dsvl_jax.convert.load import load_pretrained
from tests.helpers import torch_ref as R

TOL = 1e-4

CONFIGS = {
    # SAM grid 8 with window 3 (zero-padded windows), GQA 4 heads / 2 kv heads, hd alpha 0.7 (randomised).
    "hybrid_gqa_padded_windows": C.tiny(),
    # The 1.3B layout: SigLIP only + mlp_gelu.
    "siglip_only": C.tiny(hybrid=False),
    # Window that divides the grid, MHA, tied embeddings, tanh GELU in SigLIP, 3 SigLIP layers.
    "hybrid_tied_mha": C.tiny(tie_word_embeddings=True).replace(
        text=C.tiny().text.__class__(**{**C.tiny().text.__dict__, "num_key_value_heads": 4}),
        siglip=C.tiny().siglip.__class__(**{**C.tiny().siglip.__dict__, "hidden_act": "gelu_pytorch_tanh",
                                            "num_hidden_layers": 3}),
        sam=C.tiny().sam.__class__(**{**C.tiny().sam.__dict__, "window_size": 4, "global_attn_indexes": (2,)})),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    model = R.hf_model(cfg, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    R.save_hf(model, str(path))
    return cfg, model, str(path)


def _inputs(cfg, images_per_row, seed=0):
    n = sum(images_per_row)
    ids = R.prompt_ids(cfg, images_per_row, length=cfg.num_image_tokens * max(images_per_row) + 12, seed=seed)
    pv, hv = R.image_batch(cfg, n, seed=seed)
    return ids, pv, hv


def test_logits_match_hf_two_images_batch_of_two(hf_checkpoint):
    cfg, model, path = hf_checkpoint
    vlm = load_pretrained(path)
    ids, pv, hv = _inputs(cfg, [2, 1])
    ref = R.torch_logits(model, ids, pv, hv)
    out = np.asarray(vlm(ids, pixel_values=pv, high_res_pixel_values=hv))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= TOL


def test_logits_match_hf_text_only_with_padding(hf_checkpoint):
    cfg, model, path = hf_checkpoint
    vlm = load_pretrained(path)
    rng = np.random.default_rng(3)
    ids = rng.integers(1, cfg.image_token_id, size=(2, 17))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    ref = R.torch_logits(model, ids, attention_mask=mask)
    out = np.asarray(vlm(ids, attention_mask=mask))
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() <= TOL


def test_official_layout_round_trip_gives_same_logits(hf_checkpoint, tmp_path):
    """HF-port → ours → official layout (inverse key map) → ours: the logits still match transformers."""
    cfg, model, path = hf_checkpoint
    vlm = load_pretrained(path)
    official = save_pretrained(vlm, str(tmp_path / "official"), layout="official")
    vlm2 = load_pretrained(official)
    assert vlm2.config.replace(unused_hybrid_norms=False) == vlm.config.replace(unused_hybrid_norms=False)
    ids, pv, hv = _inputs(cfg, [1, 2], seed=5)
    ref = R.torch_logits(model, ids, pv, hv)
    assert np.abs(np.asarray(vlm2(ids, pixel_values=pv, high_res_pixel_values=hv)) - ref).max() <= TOL


def test_official_contract_matches_hf_contract(hf_checkpoint):
    """One [0,1] image per slot (+ seq/emb masks, a padded image slot) gives the HF-contract logits when the
    HF-contract tensors are the official tower's own views of those images."""
    import jax.numpy as jnp
    from dsvl_jax.models.vision import views_from_unit_images
    cfg, model, path = hf_checkpoint
    vlm = load_pretrained(path)
    ids = R.prompt_ids(cfg, [2, 1], length=cfg.num_image_tokens * 2 + 12, seed=9)
    rng = np.random.default_rng(9)
    images = rng.uniform(0, 1, size=(2, 2, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    emb = np.ones((2, 2, cfg.num_image_tokens), bool)
    emb[1, 1] = False  # row 1 has one image; its second slot is padding
    out = np.asarray(vlm(ids, images=images, images_seq_mask=ids == cfg.image_token_id, images_emb_mask=emb))
    real = images.reshape(4, 3, cfg.image_size, cfg.image_size)[[0, 1, 2]]
    pv, hv = views_from_unit_images(jnp.asarray(real), cfg)
    hv = None if hv is None else np.asarray(hv)
    ref = R.torch_logits(model, ids, np.asarray(pv), hv)
    assert np.abs(out - ref).max() <= TOL
