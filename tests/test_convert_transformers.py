"""A model born here, exported with `save_pretrained(layout="hf")`, is a complete transformers checkpoint:
`from_pretrained` reports no missing, unexpected or mismatched keys, and in float32 its logits are within
1e-4 of ours and its 20 greedy tokens (transformers' `generate`) equal ours (`VLM.generate`)."""
import json
import os

import numpy as np
import pytest
import torch

from dsvl_jax import config as C
from dsvl_jax.convert.cli import main as cli
from dsvl_jax.convert.export import save_pretrained
from dsvl_jax.runtime import VLM
from tests.helpers import torch_ref as R
from tests.test_convert_roundtrip import our_params

TOL = 1e-4
STEPS = 20

CONFIGS = {
    "hybrid": C.tiny(),
    "siglip_only": C.tiny(hybrid=False),
    "hybrid_tied": C.tiny(tie_word_embeddings=True),
}


def hf_load(cfg, path):
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration
    klass = DeepseekVLHybridForConditionalGeneration if cfg.is_hybrid else DeepseekVLForConditionalGeneration
    model, info = klass.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    cfg, params = our_params(CONFIGS[request.param], "float32", seed=len(request.param))
    path = save_pretrained((cfg, params), str(tmp_path_factory.mktemp(request.param) / "hf"), layout="hf")
    return cfg, params, path


def test_transformers_loads_every_weight(exported):
    cfg, _, path = exported
    model, info = hf_load(cfg, path)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    assert model.config.tie_word_embeddings == cfg.tie_word_embeddings
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    assert d["image_token_id"] == cfg.image_token_id and d["dtype"] == "float32"
    if cfg.tie_word_embeddings:  # tied: one stored matrix, shared by the loaded head
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_logits_match_ours(exported):
    cfg, params, path = exported
    model, _ = hf_load(cfg, path)
    ids = R.prompt_ids(cfg, [2, 1], length=2 * cfg.num_image_tokens + 10, seed=1)
    pv, hv = R.image_batch(cfg, 3, seed=1)
    ours = np.asarray(VLM(cfg, params)(ids, pixel_values=pv, high_res_pixel_values=hv))
    ref = R.torch_logits(model, ids, pv, hv)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL


def test_greedy_tokens_match_transformers_generate(exported):
    cfg, params, path = exported
    model, _ = hf_load(cfg, path)
    ids = R.prompt_ids(cfg, [1], length=cfg.num_image_tokens + 8, seed=2)
    pv, hv = R.image_batch(cfg, 1, seed=2)
    ours = VLM(cfg, params).generate(ids, pixel_values=pv, high_res_pixel_values=hv, max_new_tokens=STEPS)
    kw = {"pixel_values": torch.from_numpy(pv)}
    if hv is not None:
        kw["high_res_pixel_values"] = torch.from_numpy(hv)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                             do_sample=False, pad_token_id=0, **kw)
    theirs = out[:, ids.shape[1]:].numpy()
    assert theirs.shape == (1, STEPS)
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_bf16_export_loads_in_bf16(tmp_path):
    cfg, params = our_params(C.tiny(), "bfloat16")
    out = str(tmp_path / "hf_bf16")
    save_pretrained((cfg, params), out, layout="hf")
    model, info = hf_load(cfg, out)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_official_export_of_ours_converts_to_a_loadable_hf_port(tmp_path):
    """ours → official (save_pretrained) → HF port (CLI, streaming): transformers takes it whole."""
    cfg, params = our_params(C.tiny(), "float32", seed=9)
    off = save_pretrained((cfg, params), str(tmp_path / "off"), layout="official")
    assert cli([off, str(tmp_path / "hf"), "--to", "hf"]) == 0
    model, info = hf_load(cfg, str(tmp_path / "hf"))
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    ids = R.prompt_ids(cfg, [1], length=cfg.num_image_tokens + 6, seed=4)
    pv, hv = R.image_batch(cfg, 1, seed=4)
    ours = np.asarray(VLM(cfg, params)(ids, pixel_values=pv, high_res_pixel_values=hv))
    assert np.abs(ours - R.torch_logits(model, ids, pv, hv)).max() <= TOL
