"""The Mosaic relpos kernel lowers and compiles for real TPU generations (ahead of time, via libtpu,
on a CPU-only machine): forward + backward at SAM-B's global shape, 12 heads x 4,096 tokens x 64, bf16.

Also checks the memory point of the kernel: its compiled temp memory is at most 1/8 of one float32
[12, 4096, 4096] logits array (96 MiB), which XLA attention with the materialised bias must hold at
least once (it compiles to 2.3-3.5 GiB; see benchmarks/relpos_attention.py). On v5e XLA places
small temporaries in the 128 MiB VMEM, so HBM temp can read 0 there. Skips when libtpu is absent.
"""
from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsvl_jax.ops import relpos_attention

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed"),
]

TOPOLOGIES = ("v5p:2x2x1", "v5e:2x2")


def one_chip(topology_name):
    """A one-device sharding on the first chip of a described (not present) TPU slice."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
    except Exception as e:  # libtpu present but unable to describe the slice
        pytest.skip(f"cannot describe TPU topology {topology_name}: {e}")
    return NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), P())


def compile_train_step(sharding, impl, *, heads, grid, head_dim, dtype, **blocks):
    """Compile value_and_grad of sum(attention) w.r.t. q, k, v and both tables."""
    H, W = grid
    qkv = jax.ShapeDtypeStruct((1, heads, H * W, head_dim), dtype, sharding=sharding)
    tables = (jax.ShapeDtypeStruct((2 * H - 1, head_dim), jnp.float32, sharding=sharding),
              jax.ShapeDtypeStruct((2 * W - 1, head_dim), jnp.float32, sharding=sharding))
    attention = functools.partial(relpos_attention, grid=grid, impl=impl, **blocks)

    def loss(*args):
        return jnp.sum(attention(*args).astype(jnp.float32))

    step = jax.value_and_grad(loss, argnums=tuple(range(5)))
    return jax.jit(step).lower(qkv, qkv, qkv, *tables).compile()


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_sam_global_shape_compiles_in_an_eighth_of_one_logits_array(topology):
    sharding = one_chip(topology)
    shape = dict(heads=12, grid=(64, 64), head_dim=64, dtype=jnp.bfloat16)
    kernel = compile_train_step(sharding, "pallas", **shape)
    hlo = kernel.as_text()
    for name in ("relpos_flash_fwd", "relpos_flash_dkv", "relpos_flash_dq"):
        assert name in hlo, f"{name} kernel missing from the compiled program"
    assert "4096,4096" not in hlo, "an N x N array appears in the compiled kernel program"
    kernel_temp = kernel.memory_analysis().temp_size_in_bytes
    logits_bytes = 12 * 4096 * 4096 * 4
    assert kernel_temp * 8 <= logits_bytes, f"kernel temp {kernel_temp / 2**20:.1f} MiB"


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("dtype, grid", [(jnp.float32, (16, 24)), (jnp.bfloat16, (14, 20)),
                                         (jnp.bfloat16, (66, 3))])
def test_small_padded_and_tall_shapes_compile(topology, dtype, grid):
    """float32 inputs (full-precision MXU passes), a token count that needs padding + key masks
    (14 x 20 = 280 -> 384) and a grid side over 64 (h and w bias rows in separate lane tiles)
    also lower through Mosaic: the three kernels are in the program, no tokens x tokens array is, and the
    compiled step returns a float32 loss and one gradient per input, each with its input's shape and dtype."""
    heads, head_dim = 2, 64
    compiled = compile_train_step(one_chip(topology), "pallas", heads=heads, grid=grid, head_dim=head_dim,
                                  dtype=dtype, block_q=128, block_k=128)
    hlo = compiled.as_text()
    for name in ("relpos_flash_fwd", "relpos_flash_dkv", "relpos_flash_dq"):
        assert name in hlo, f"{name} kernel missing from the compiled program"
    n = grid[0] * grid[1]
    padded = -(-n // 128) * 128
    for side in {n, padded}:
        assert f"{side},{side}]" not in hlo, f"a {side} x {side} array appears in the compiled program"
    loss, grads = compiled.out_info
    assert (loss.shape, loss.dtype) == ((), jnp.float32)
    want = [((1, heads, n, head_dim), dtype)] * 3 + [((2 * grid[0] - 1, head_dim), jnp.float32),
                                                     ((2 * grid[1] - 1, head_dim), jnp.float32)]
    assert [(g.shape, g.dtype) for g in grads] == want
