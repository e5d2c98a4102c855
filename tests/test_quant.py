"""Weight-only int8 (`dsvl_jax.models.quant`) and `--weights fp32|bf16|int8` on tiny configs: quality
against fp32, 8-device sharding, Orbax round-trip, export, and bad values refused."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from dsvl_jax import config as C, sharding
from dsvl_jax.convert import cli as convert_cli
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.convert.orbax_io import load_orbax_params, save_orbax_params
from dsvl_jax.generation import chat_cli
from dsvl_jax.models.quant import dequantize_params, quantize_array, quantize_params
from dsvl_jax.models.vlm import DeepseekVL, dummy_inputs
from dsvl_jax.runtime import VLM
from dsvl_jax.serve.model import LoadError, load as serve_load
from dsvl_jax.state import param_shardings

PROMPTS, PROMPT_LEN, NEW = 16, 12, 32


@pytest.fixture(scope="module")
def fp32():
    """A text-only tiny model with its random init (std 0.02), and 16 random prompts."""
    cfg = C.tiny(hybrid=False)
    ids, images = dummy_inputs(cfg)
    params = jax.jit(lambda key: nn.meta.unbox(DeepseekVL(cfg).init(key, ids, **images)["params"]))(jax.random.key(0))
    prompts = np.random.default_rng(0).integers(0, cfg.image_token_id - 1, (PROMPTS, PROMPT_LEN))
    return VLM(cfg, params), prompts


def _logits(vlm, ids):
    """Text-only forward through the module (generated ids may include the image token id)."""
    return np.asarray(jax.jit(vlm.module.apply)({"params": vlm.params}, ids))


def test_quantize_array_is_per_output_channel_symmetric():
    w = np.random.default_rng(1).standard_normal((3, 5, 2, 4)).astype(np.float32)  # [layers, in, out...]
    w[0, :, 1, 2] = 0.0  # an all-zero output channel
    q, s = quantize_array(w, n_in=1, lead=1)
    assert q.dtype == np.int8 and s.shape == (3, 2, 4) and s.dtype == np.float32
    assert np.abs(q).max() == 127 and q.min() >= -127
    np.testing.assert_array_equal(np.abs(q).max(axis=1)[s != 1.0], 127)  # each channel uses the full range
    assert s[0, 1, 2] == 1.0 and not q[0, :, 1, 2].any()
    err = np.abs(q * s[:, None] - w)
    assert np.all(err <= s[:, None] / 2 * (1 + 1e-6))  # rounding: at most half a step


def test_int8_forward_is_fp32_on_dequantized_weights(fp32):
    """The cheap check: int8 matmul + scale == float matmul on q * scale (float32 rounding only), and
    close to fp32 on the original weights (bound derived in the heavy test below)."""
    vlm, prompts = fp32
    q = vlm.with_weights("int8")
    assert q.weights == "int8" and q.with_weights("int8") is q and vlm.with_weights("fp32") is vlm
    quant, base = _logits(q, prompts), _logits(vlm, prompts)
    deq = _logits(VLM(vlm.config, dequantize_params(q.params)), prompts)
    np.testing.assert_allclose(quant, deq, rtol=0, atol=1e-5 * np.abs(deq).max())
    assert np.abs(quant - base).max() / base.std() < 0.1


@pytest.mark.heavy
def test_int8_logits_and_greedy_tokens_against_fp32(fp32):
    """int8 is exactly fp32 run on the dequantized weights, and close to fp32 on the original ones.

    Bound: teacher-forced greedy agreement ≥ 95 % over the 16 × 32 continuation tokens (the fp32
    continuation as context, so each step is judged once; a free-running comparison would count every
    token after a first flip as wrong). Why 95 %: per output channel the rounding error is at most
    scale/2 = max|w|/254, about 0.8 % of a Gaussian column's RMS, compounding over 2 layers × 7 linears
    + lm_head to a few % of the logits' spread (measured max |Δ| / std = 0.044). A random-weight model
    is the hard case: its logits over the 512-token vocabulary are near-Gaussian, so the top-2 margin is
    small (median 0.24 std) and a few % of steps are near-ties that any perturbation flips; bf16 weights
    flip 0.8 %, int8 1.6 % here
    (free-running, the same steps compound to 75 % and 63 % of tokens equal). A broken quantizer (wrong scale axis, no scale) changes
    the logits by their own order of magnitude (measured max |Δ| / std: 2.9 with each scale vector reversed,
    1.6 with one mean scale), which the relative-error bound of 0.1 catches first."""
    vlm, prompts = fp32
    q = vlm.with_weights("int8")
    assert q.weights == "int8" and q.with_weights("int8") is q
    tokens = vlm.generate(prompts, max_new_tokens=NEW)
    full = np.concatenate([prompts, tokens], axis=1)
    base, quant = _logits(vlm, full)[:, PROMPT_LEN - 1:-1], _logits(q, full)[:, PROMPT_LEN - 1:-1]
    # The implementation: int8 matmul + scale == float matmul on q * scale (float32 rounding only).
    deq = _logits(VLM(vlm.config, dequantize_params(q.params)), full)[:, PROMPT_LEN - 1:-1]
    np.testing.assert_allclose(quant, deq, rtol=0, atol=1e-5 * np.abs(deq).max())
    rel = np.abs(quant - base).max() / base.std()
    assert rel < 0.1, rel
    agree = (quant.argmax(-1) == tokens).mean()
    assert agree >= 0.95, agree
    # The int8 decode (KV cache, compiled loop) follows its own logits: its first token equals its prefill argmax.
    out = vlm.generate(prompts, max_new_tokens=NEW, weights="int8")
    np.testing.assert_array_equal(out[:, 0], _logits(q, prompts)[:, -1].argmax(-1))
    assert (out == tokens).mean() > 0.5  # free-running: a first flip changes every later context


@pytest.mark.heavy
def test_sharded_int8_decode_equals_single_device(fp32):
    vlm, prompts = fp32
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    placed = VLM(vlm.config, jax.device_put(vlm.params, param_shardings(vlm.config, mesh)[0]), mesh=mesh)
    q = placed.with_weights("int8")
    attn = q.params["language_model"]["layers"]["self_attn"]
    float_spec = placed.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec
    assert attn["q_proj"]["kernel"].dtype == np.int8 and attn["q_proj"]["kernel"].sharding.spec == float_spec
    assert attn["q_proj"]["scale"].sharding.spec == P(None, "tensor", None)  # [layers, heads, head_dim]
    np.testing.assert_array_equal(q.generate(prompts[:4], max_new_tokens=16),
                                  vlm.generate(prompts[:4], max_new_tokens=16, weights="int8"))


def test_orbax_round_trip_bit_exact_and_export_dequantizes(fp32, tmp_path, capsys):
    vlm, _ = fp32
    src = str(tmp_path / "float")
    save_orbax_params(src, vlm.config, jax.tree.map(np.asarray, vlm.params))
    q_dir = str(tmp_path / "int8")
    assert convert_cli.main([src, q_dir, "--to", "orbax", "--quantize", "int8"]) == 0
    want = traverse_util.flatten_dict(quantize_params(jax.tree.map(np.asarray, vlm.params)), sep="/")  # on the host, as the CLI
    cfg, got = load_orbax_params(q_dir)
    got = traverse_util.flatten_dict(got, sep="/")
    assert cfg.quantization == "int8" and set(got) == set(want)
    for p in want:
        assert got[p].dtype == want[p].dtype, p
        np.testing.assert_array_equal(got[p], want[p], err_msg=p)
    loaded = load_pretrained(q_dir)  # straight into a VLM, int8 kept
    assert loaded.weights == "int8"
    assert loaded.params["language_model"]["lm_head"].dtype == np.int8
    again = str(tmp_path / "again")  # saved again from the VLM: the same bits
    save_orbax_params(again, loaded.config, loaded.params)
    for p, a in traverse_util.flatten_dict(load_orbax_params(again)[1], sep="/").items():
        assert a.dtype == want[p].dtype and np.array_equal(a, want[p]), p

    hf_dir = str(tmp_path / "hf")
    assert convert_cli.main([q_dir, hf_dir, "--to", "hf"]) == 0
    assert "dequantized" in capsys.readouterr().err
    back = traverse_util.flatten_dict(load_pretrained(hf_dir).params, sep="/")
    deq = traverse_util.flatten_dict(dequantize_params(traverse_util.unflatten_dict(want, sep="/")), sep="/")
    for p in deq:
        np.testing.assert_array_equal(np.asarray(back[p]), deq[p], err_msg=p)


def test_bad_weights_values_are_refused(fp32, tmp_path, capsys):
    vlm, prompts = fp32
    with pytest.raises(ValueError, match="weights='int4': expected one of fp32, bf16, int8"):
        vlm.generate(prompts[:1], max_new_tokens=2, weights="int4")
    with pytest.raises(SystemExit) as e:
        chat_cli.main(["--ckpt", str(tmp_path), "--weights", "int4", "hi"])
    assert e.value.code == 2 and "--weights: invalid choice: 'int4'" in capsys.readouterr().err
    with pytest.raises(LoadError, match="--weights='int4'"):
        serve_load(str(tmp_path), weights="int4")
    assert convert_cli.main([str(tmp_path), str(tmp_path / "x"), "--to", "hf", "--quantize", "int8"]) == 2
    assert "--quantize int8 needs --to orbax" in capsys.readouterr().err
    with pytest.raises(ValueError, match="quantization='int4'"):
        C.tiny(hybrid=False).replace(quantization="int4")
