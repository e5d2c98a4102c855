"""LoRA adapters on the tiny hybrid model (LLM, SigLIP and adaptor targets): zero adapters give the base model's
logits bit for bit; A follows the kernel's input axes and B its output axes; the LoRA forward equals the merged
kernel W + (alpha/r)·A·B; a PEFT export of the adapters loads onto transformers' model through peft with our
logits (images included), and reads back bit-exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from peft import PeftModel

from dsvl_jax import config as C
from dsvl_jax.convert import peft_io
from dsvl_jax.convert.export import save_pretrained
from dsvl_jax.errors import CheckpointError
from dsvl_jax.models import lora
from dsvl_jax.models.vlm import DeepseekVL, dummy_inputs
from dsvl_jax.state import param_shapes
from tests.helpers import torch_ref as R
from tests.test_convert_roundtrip import our_params
from tests.test_convert_transformers import hf_load

TOL = 1e-4  # float32 logits of two frameworks (as tests/test_convert_transformers.py)
SPEC = lora.LoraSpec(rank=4, alpha=8.0, targets=("llm", "siglip_attn", "siglip_mlp", "adaptor"))


@pytest.fixture(scope="module")
def model():
    cfg, params = our_params(C.tiny(), "float32", seed=7)
    module = DeepseekVL(cfg)
    ids, images = dummy_inputs(cfg)
    adapters = jax.jit(lambda key: lora.init_adapters(module, SPEC, key, ids, **images))(jax.random.key(1))
    fwd = jax.jit(lambda p, a, ids, pv, hv: lora.apply(module, p, a, ids, spec=SPEC, pixel_values=pv,
                                                       high_res_pixel_values=hv))
    base = jax.jit(lambda p, ids, pv, hv: module.apply({"params": p}, ids, pixel_values=pv, high_res_pixel_values=hv))
    ids = R.prompt_ids(cfg, [1, 1], length=cfg.num_image_tokens + 12, seed=3)
    pv, hv = R.image_batch(cfg, 2, seed=3)
    return cfg, params, adapters, fwd, base, (ids, pv, hv)


def _random_b(adapters, seed=0):
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(adapters, sep="/")
    return {k: np.asarray(v) if k.endswith(lora.A_NAME) else rng.normal(0, 0.2, v.shape).astype(np.float32)
            for k, v in flat.items()}


def test_zero_adapters_give_the_base_logits_bit_for_bit(model):
    cfg, params, adapters, fwd, base, inputs = model
    flat = traverse_util.flatten_dict(adapters, sep="/")
    assert len(lora.layer_paths(adapters)) == 7 + 6 + 3  # LLM q k v o gate up down; SigLIP q k v proj fc1 fc2; 3 adaptor
    assert not any(np.any(v) for k, v in flat.items() if k.endswith(lora.B_NAME))
    assert all(np.any(v) for k, v in flat.items() if k.endswith(lora.A_NAME))
    np.testing.assert_array_equal(np.asarray(fwd(params, adapters, *inputs)), np.asarray(base(params, *inputs)))


def test_adapter_axes_follow_the_kernel():
    cfg = C.tiny()
    ids, images = dummy_inputs(cfg)
    boxed = traverse_util.flatten_dict(lora.abstract_adapters(DeepseekVL(cfg), SPEC, ids, **images), sep="/")
    names = {k: tuple(v.names) for k, v in boxed.items()}
    assert names["language_model/layers/self_attn/q_proj/lora_a"] == ("layers", "embed", None)
    assert names["language_model/layers/self_attn/q_proj/lora_b"] == ("layers", None, "heads", "head_dim")
    assert names["language_model/layers/self_attn/o_proj/lora_a"] == ("layers", "heads", "head_dim", None)
    assert names["language_model/layers/self_attn/o_proj/lora_b"] == ("layers", None, "embed")
    assert names["aligner/fc_1/lora_a"] == ("mlp", None) and names["aligner/fc_1/lora_b"] == (None, "embed")
    with pytest.raises(ValueError, match="match no dense layer"):
        lora.abstract_adapters(DeepseekVL(cfg), lora.LoraSpec(4, 8.0, targets=("re:nothing",)), ids, **images)
    with pytest.raises(ValueError, match="lora.targets entry 'llmm'"):
        lora.LoraSpec(4, 8.0, targets=("llmm",))


def test_lora_forward_equals_the_merged_kernels(model):
    cfg, params, adapters, fwd, base, inputs = model
    trained = traverse_util.unflatten_dict(_random_b(adapters), sep="/")
    ours = np.asarray(fwd(params, trained, *inputs))
    merged = np.asarray(base(lora.merge(params, trained, SPEC), *inputs))
    assert np.abs(ours - np.asarray(base(params, *inputs))).max() > 100 * TOL
    assert np.abs(ours - merged).max() <= 1e-5 * max(1.0, np.abs(ours).max())


def test_peft_export_loads_onto_transformers_with_our_logits(model, tmp_path):
    cfg, params, adapters, fwd, base, inputs = model
    flat = _random_b(adapters, seed=1)
    ours = np.asarray(fwd(params, traverse_util.unflatten_dict(flat, sep="/"), *inputs))
    hf_dir = save_pretrained((cfg, params), str(tmp_path / "hf"), layout="hf")
    peft_dir = peft_io.write_peft(str(tmp_path / "peft"), cfg, SPEC, flat)
    peft_model = PeftModel.from_pretrained(hf_load(cfg, hf_dir)[0], peft_dir).eval()
    assert np.abs(R.torch_logits(peft_model, *inputs) - ours).max() <= TOL
    spec, back = peft_io.read_peft(peft_dir, cfg, param_shapes(cfg))
    assert (spec.rank, spec.alpha) == (SPEC.rank, SPEC.alpha) and back.keys() == flat.keys()
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k], err_msg=k)


def test_layers_the_hf_port_fuses_have_no_peft_form():
    cfg = C.tiny()
    spec = lora.LoraSpec(4, 8.0, targets=("vision/sam/blocks_0/q",))
    ids, images = dummy_inputs(cfg)
    boxed = traverse_util.flatten_dict(lora.abstract_adapters(DeepseekVL(cfg), spec, ids, **images), sep="/")
    with pytest.raises(CheckpointError, match="fuses it with"):
        peft_io.adapter_tensors(cfg, {k: np.zeros(v.value.shape, np.float32) for k, v in boxed.items()})


def test_dropout_is_keyed_and_off_without_a_key(model):
    cfg, params, adapters, fwd, base, inputs = model
    trained = traverse_util.unflatten_dict(_random_b(adapters), sep="/")
    spec = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.5, targets=SPEC.targets)
    module = DeepseekVL(cfg)
    ids = jnp.asarray(inputs[0][:, :12])
    run = jax.jit(lambda key: lora.apply(module, params, trained, ids, spec=spec, rng=key))
    plain = jax.jit(lambda: lora.apply(module, params, trained, ids, spec=spec))()
    np.testing.assert_array_equal(run(jax.random.key(0)), run(jax.random.key(0)))
    assert not np.array_equal(run(jax.random.key(0)), run(jax.random.key(1)))
    assert not np.array_equal(run(jax.random.key(0)), plain)
