"""SAM relpos attention: the Pallas kernel (interpreted on CPU) and the blockwise XLA path against the
plain reference, forward and all five gradients.

Tolerances. float32: outputs within 1e-5 max abs, gradients within 1e-4 relative, where relative is
max|Δ| / max|reference| per tensor. bfloat16: within 1e-2 relative (2.5 bf16 ulps) of the float32
reference evaluated on the same bf16-rounded inputs; the XLA reference itself run in bf16 lands at
0.4-0.9 % there.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from dsvl_jax.ops import relpos_attention
from dsvl_jax.ops.reference import relpos_attention_reference
from dsvl_jax.ops.relpos_attention import IMPLS, resolve_impl
from dsvl_jax.ops.relpos_blockwise import relpos_attention_blockwise
from dsvl_jax.ops.relpos_pallas import tile_sizes

KERNELS = ("pallas_interpret", "blockwise")
NAMES = ("out", "dq", "dk", "dv", "d_rel_pos_h", "d_rel_pos_w")


def make_inputs(batch, heads, grid, head_dim, dtype=jnp.float32, seed=0):
    """q, k, v, both tables and an output cotangent; tables big enough that the bias matters."""
    H, W = grid
    keys = jax.random.split(jax.random.key(seed), 6)
    shape = (batch, heads, H * W, head_dim)
    q, k, v, ct = (jax.random.normal(keys[i], shape, jnp.float32).astype(dtype) for i in (0, 1, 2, 5))
    rel_h = (0.3 * jax.random.normal(keys[3], (2 * H - 1, head_dim))).astype(dtype)
    rel_w = (0.3 * jax.random.normal(keys[4], (2 * W - 1, head_dim))).astype(dtype)
    return (q, k, v, rel_h, rel_w), ct


def forward_and_grads(attention, args, ct):
    """(output, dq, dk, dv, d_rel_h, d_rel_w) of sum(attention(*args) * ct), in float32."""

    def run(*a):
        out, vjp = jax.vjp(attention, *a)
        return (out,) + vjp(ct.astype(out.dtype))

    return tuple(x.astype(jnp.float32) for x in jax.jit(run)(*args))


def rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def assert_f32_match(got, want):
    out_err = float(jnp.max(jnp.abs(got[0] - want[0])))
    assert out_err <= 1e-5, f"output max abs error {out_err:.2e}"
    for name, g, w in zip(NAMES[1:], got[1:], want[1:]):
        assert rel_err(g, w) <= 1e-4, f"{name}: relative error {rel_err(g, w):.2e}"
        assert float(jnp.max(jnp.abs(w))) > 0, f"{name}: reference gradient is all zero"


def impl_fn(impl, grid, **blocks):
    return functools.partial(relpos_attention, grid=grid, impl=impl, **blocks)


def reference_fn(grid):
    return functools.partial(relpos_attention_reference, grid=grid)


@functools.lru_cache(maxsize=4)
def reference_results(batch, heads, grid, head_dim, dtype):
    """float32 reference on the (dtype-rounded) inputs; cached because both kernels compare to it."""
    args, ct = make_inputs(batch, heads, grid, head_dim, dtype)
    upcast = tuple(a.astype(jnp.float32) for a in args)
    return forward_and_grads(reference_fn(grid), upcast, ct.astype(jnp.float32))


def check_f32(impl, batch, heads, grid, head_dim, **blocks):
    args, ct = make_inputs(batch, heads, grid, head_dim)
    got = forward_and_grads(impl_fn(impl, grid, **blocks), args, ct)
    assert_f32_match(got, reference_results(batch, heads, grid, head_dim, jnp.float32))


def check_bf16(impl, batch, heads, grid, head_dim, **blocks):
    args, ct = make_inputs(batch, heads, grid, head_dim, jnp.bfloat16)
    got = forward_and_grads(impl_fn(impl, grid, **blocks), args, ct)
    truth = reference_results(batch, heads, grid, head_dim, jnp.bfloat16)
    for name, g, w in zip(NAMES, got, truth):
        assert rel_err(g, w) <= 1e-2, f"bf16 {name}: relative error {rel_err(g, w):.2e}"


# ------------------------------------------------------------------------------------ small shapes
@pytest.mark.parametrize("impl", KERNELS)
def test_token_count_not_a_multiple_of_the_block_f32(impl):
    # 300 tokens: Pallas pads to 384 (3 key tiles of 128, the last with 44 real keys, one query
    # tile of 384); blockwise runs 3 query blocks of 128, the last with 44 real rows.
    blocks = {"block_q": 384, "block_k": 128} if impl.startswith("pallas") else {"block_q": 128}
    check_f32(impl, 1, 1, (12, 25), 32, **blocks)


@pytest.mark.parametrize("impl", KERNELS)
def test_small_grid_batch_and_several_tiles_f32(impl):
    # Non-square 17 x 16 = 272 tokens: 3 query and 3 key tiles per head, batch 2 x 2 heads.
    check_f32(impl, 2, 2, (17, 16), 32, block_q=128, block_k=128)


@pytest.mark.parametrize("impl", KERNELS)
def test_small_grid_bf16(impl):
    check_bf16(impl, 1, 2, (9, 15), 32, block_q=128, block_k=128)


@pytest.mark.parametrize("impl", KERNELS)
def test_inside_shard_map_heads_sharded(impl):
    """8 CPU devices as data 2 x model 4: batch over data, heads over model; replicated tables get
    their gradient summed over the head shards by shard_map's transpose."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    grid = (10, 12)
    spec = P("data", "model", None, None)
    sharded = jax.shard_map(impl_fn(impl, grid, block_q=128, block_k=128), mesh=mesh,
                            in_specs=(spec, spec, spec, P(), P()), out_specs=spec, check_vma=False)
    args, ct = make_inputs(2, 4, grid, 16, seed=3)
    assert_f32_match(forward_and_grads(sharded, args, ct), forward_and_grads(reference_fn(grid), args, ct))


@pytest.mark.slow
def test_pallas_under_the_tpu_semantics_interpreter():
    """The TPU-modelling interpreter (memory spaces, DMAs, VMEM filled with NaN before use) runs the
    non-interpret kernels: no read of unwritten scratch or output blocks, same numbers."""
    from jax.experimental.pallas import tpu as pltpu

    params = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True)
    with pltpu.force_tpu_interpret_mode(params):
        check_f32("pallas", 1, 2, (9, 15), 32, block_q=128, block_k=128)


# ------------------------------------------------------------------- SAM-B global block: 64 x 64
@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_sam_global_shape_f32(impl):
    check_f32(impl, 1, 1, (64, 64), 64)


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_sam_global_shape_bf16(impl):
    check_bf16(impl, 1, 1, (64, 64), 64)


# ------------------------------------------------------------------------- dispatch and validation
def test_auto_is_blockwise_off_tpu():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") == "blockwise"
    for impl in IMPLS[1:]:
        assert resolve_impl(impl) == impl


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "pallas"])  # "pallas" needs a TPU (AOT file)
def test_every_impl_matches_the_reference(impl):
    grid = (4, 7)
    args, _ = make_inputs(1, 2, grid, 8, seed=5)
    out = relpos_attention(*args, grid=grid, impl=impl, scale=0.3)
    want = relpos_attention_reference(*args, grid=grid, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=0)


def test_bias_matters():
    """Guards the tests above: the tables change the output, so matching the reference means
    the bias is right, not merely present."""
    grid = (17, 16)
    args, _ = make_inputs(2, 2, grid, 32)
    with_bias = relpos_attention_reference(*args, grid=grid)
    zero = jnp.zeros_like
    without = relpos_attention_reference(*args[:3], zero(args[3]), zero(args[4]), grid=grid)
    assert float(jnp.max(jnp.abs(with_bias - without))) > 0.1


@pytest.mark.parametrize("bad, match", [
    (dict(impl="flash"), "impl='flash'"),
    (dict(grid=(8, 8)), "grid"),
    (dict(grid=(6,)), "grid"),
    (dict(rel_pos_h=jnp.zeros((10, 16))), "rel_pos_h shape"),
    (dict(rel_pos_w=jnp.zeros((19, 8))), "rel_pos_w shape"),
    (dict(k=jnp.zeros((1, 1, 60, 16), jnp.bfloat16)), "k dtype"),
    (dict(v=jnp.zeros((1, 1, 60, 8))), "v shape"),
    (dict(impl="pallas_interpret", block_q=100), "block_q=100"),
    (dict(impl="pallas_interpret", block_k=64), "block_k=64"),
    (dict(impl="blockwise", block_q=0), "block_q=0"),
])
def test_bad_arguments_are_named(bad, match):
    (q, k, v, rel_h, rel_w), _ = make_inputs(1, 1, (6, 10), 16)
    kwargs = dict(q=q, k=k, v=v, rel_pos_h=rel_h, rel_pos_w=rel_w, grid=(6, 10), impl="blockwise")
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        relpos_attention(**kwargs)


@pytest.mark.parametrize("n, blocks, want", [
    (4096, (512, 512), (512, 512, 4096)),
    (300, (384, 128), (384, 128, 384)),
    (300, (256, 256), (128, 128, 384)),  # 256 does not divide 384: fall back to 128
    (64, (512, 512), (128, 128, 128)),
    (4097, (512, 512), (384, 384, 4224)),  # 4224 = 33 x 128
])
def test_tile_sizes(n, blocks, want):
    assert tile_sizes(n, *blocks) == want


def test_blockwise_memory_is_linear_in_tokens():
    """CPU compiled temp memory of forward+backward: the blockwise path holds [block, N] logits,
    the reference [N, N] (N = 1,024 here, block 128: 8x fewer live logits)."""
    grid, block = (32, 32), 128
    args, ct = make_inputs(1, 2, grid, 32)

    def temp_bytes(attention):
        def loss(*a):
            return jnp.sum(attention(*a) * ct)
        compiled = jax.jit(jax.grad(loss, argnums=tuple(range(5)))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    blockwise = temp_bytes(functools.partial(relpos_attention_blockwise, grid=grid, block_q=block))
    reference = temp_bytes(reference_fn(grid))
    logits_bytes = 2 * 1024 * 1024 * 4  # one [heads, N, N] float32 array
    assert reference >= logits_bytes
    assert blockwise * 4 <= reference, (blockwise, reference)
