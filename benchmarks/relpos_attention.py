"""SAM global attention with decomposed relative positions: memory and time of each implementation.

    .venv/bin/python benchmarks/relpos_attention.py [--heads 12] [--cpu-heads 12] [--repeats 3]
                                                    [--topologies v5p:2x2x1,v5e:2x2] [--skip-cpu] [--dry-run]

Shape: SAM-B's global block at 1024 px, 1 image x heads x 4,096 tokens (64 x 64) x head_dim 64; every
figure is forward + backward (value and grads of q, k, v and both tables).

1. TPU, compiled ahead of time through libtpu (no TPU needed): temp HBM of the Pallas kernel vs XLA
   attention with the materialised [B, h, N, N] bias (target: kernel <= 1/8), the blockwise XLA path,
   and for scale JAX's own flash attention and plain attention *without* any bias. bf16.
   On v5e XLA may keep temporaries in the 128 MiB VMEM, so its HBM temp can read lower (even 0).
2. This machine's CPU, float32: compiled temp memory and median wall time, blockwise vs the reference.
3. GPU, when one is visible to JAX: wall time of blockwise vs reference, bf16 and float32.

`--dry-run` (what `make test` runs): every section at a 16 x 16 grid, one head, one repeat, v5p only.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import time

# libtpu compiles here (no TPU used); let it load while another process (a test, a compile) holds it
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from dsvl_jax.ops import relpos_attention  # noqa: E402

GRID, HEAD_DIM = (64, 64), 64
MIB = 2 ** 20


def train_step(attention):
    """(loss, grads) of sum(attention(q, k, v, rel_h, rel_w)) — a forward and a full backward."""
    def loss(*args):
        return jnp.sum(attention(*args).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=tuple(range(5)))


def relpos(impl, grid=GRID):
    return train_step(functools.partial(relpos_attention, grid=grid, impl=impl))


def no_bias(kind):
    """Attention without any bias, for scale: JAX's Pallas TPU flash attention or plain XLA."""
    def attention(q, k, v, rel_h, rel_w):
        del rel_h, rel_w
        scale = q.shape[-1] ** -0.5
        if kind == "flash":
            from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention
            return flash_attention(q, k, v, sm_scale=scale)
        logits = scale * jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    return train_step(attention)


def abstract_inputs(heads, dtype, sharding=None, grid=GRID):
    H, W = grid
    qkv = jax.ShapeDtypeStruct((1, heads, H * W, HEAD_DIM), dtype, sharding=sharding)
    return (qkv, qkv, qkv, jax.ShapeDtypeStruct((2 * H - 1, HEAD_DIM), jnp.float32, sharding=sharding),
            jax.ShapeDtypeStruct((2 * W - 1, HEAD_DIM), jnp.float32, sharding=sharding))


def tpu_section(topologies, heads, grid=GRID):
    if not topologies:
        return
    if importlib.util.find_spec("libtpu") is None:
        print("TPU: libtpu not installed (pip install 'jax[tpu]'); skipped")
        return
    from jax.experimental import topologies as topo_lib

    cases = [("pallas kernel (in-kernel bias)", relpos("pallas", grid)),
             ("XLA, materialised N x N bias", relpos("reference", grid)),
             ("XLA blockwise (query blocks)", relpos("blockwise", grid)),
             ("JAX flash, no bias", no_bias("flash")),
             ("XLA plain, no bias", no_bias("plain"))]
    print(f"\nTPU ahead-of-time compile, fwd+bwd, 1 x {heads} heads x {grid[0] * grid[1]} x {HEAD_DIM}, bf16")
    print(f"{'topology':<11} {'implementation':<32} {'temp MiB':>9} {'compile s':>9}")
    for name in topologies:
        topo = topo_lib.get_topology_desc(platform="tpu", topology_name=name)
        sharding = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), P())
        temps = {}
        for label, step in cases:
            t0 = time.perf_counter()
            compiled = jax.jit(step).lower(*abstract_inputs(heads, jnp.bfloat16, sharding, grid)).compile()
            temps[label] = compiled.memory_analysis().temp_size_in_bytes
            print(f"{name:<11} {label:<32} {temps[label] / MIB:>9.1f} {time.perf_counter() - t0:>9.1f}", flush=True)
        kernel, xla = temps[cases[0][0]], temps[cases[1][0]]
        print(f"{name:<11} kernel / materialised-bias XLA = {kernel / xla:.4f} (target <= 0.125)")


def concrete_inputs(heads, dtype, device, grid=GRID, head_dim=HEAD_DIM):
    H, W = grid
    keys = jax.random.split(jax.random.key(0), 5)
    shape = (1, heads, H * W, head_dim)
    args = [jax.random.normal(keys[i], shape).astype(dtype) for i in range(3)]
    args += [0.3 * jax.random.normal(keys[3], (2 * H - 1, head_dim)),
             0.3 * jax.random.normal(keys[4], (2 * W - 1, head_dim))]
    return [jax.device_put(a, device) for a in args]


def time_on(device, impls, heads, dtype, repeats, label, grid=GRID):
    args = concrete_inputs(heads, dtype, device, grid)
    print(f"\n{label}: fwd+bwd, 1 x {heads} heads x {grid[0] * grid[1]} x {HEAD_DIM}, {jnp.dtype(dtype).name}")
    print(f"{'implementation':<12} {'temp MiB':>9} {'compile s':>9} {'median s':>9}")
    for impl in impls:
        t0 = time.perf_counter()
        compiled = jax.jit(relpos(impl, grid)).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        temp = compiled.memory_analysis().temp_size_in_bytes
        jax.block_until_ready(compiled(*args))  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        print(f"{impl:<12} {temp / MIB:>9.1f} {compile_s:>9.1f} {statistics.median(times):>9.3f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=12, help="heads for the TPU and GPU figures")
    parser.add_argument("--cpu-heads", type=int, default=12, help="heads for the CPU timing (memory: ~4 GB at 12)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--topologies", default="v5p:2x2x1,v5e:2x2")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="16 x 16 grid, 1 head, 1 repeat, v5p only")
    a = parser.parse_args(argv)
    grid = GRID
    if a.dry_run:
        grid = (16, 16)  # 256 tokens: the smallest grid whose sequence fills the TPU kernels' 128-row blocks
        a.heads, a.cpu_heads, a.repeats, a.topologies = 1, 1, 1, "v5p:2x2x1"

    tpu_section([t for t in a.topologies.split(",") if t], a.heads, grid)
    if not a.skip_cpu:
        time_on(jax.devices("cpu")[0], ("blockwise", "reference"), a.cpu_heads, jnp.float32, a.repeats,
                f"CPU ({os.cpu_count()} cores)", grid)
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        print("\nGPU: none visible to JAX; skipped")
        return
    for dtype in (jnp.bfloat16, jnp.float32):
        time_on(gpu, ("blockwise", "reference"), a.heads, dtype, a.repeats, f"GPU {gpu.device_kind}", grid)


if __name__ == "__main__":
    main()
