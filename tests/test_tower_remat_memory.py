"""Per-tower remat policies change the COMPILED memory in the expected direction (issue 20): full remat of a
tower lowers the temp memory of that tower's forward + backward as the TPU compiler plans it (libtpu, one v5p
chip, abstract inputs only, as tools/aot_compile.py compiles; skipped without libtpu).

Each tower is compiled alone, with the module and policy argument the model builds it with (`VisionTowers`:
`SamTower(..., remat_policy=cfg.tower_remat("sam"))`, `SiglipTower(...)`): a policy acts only on its own
tower's backward, and a whole train step costs ~10 s a compile here against ~3 s for a tower. (The CPU
compiler is no measure: its temp bytes rose with full SAM remat, see tests/test_tower_remat.py.)

The bound: without remat the backward keeps every block's softmax probabilities [images, heads, T, T] (f32)
from the forward; full remat keeps only each block's input and recomputes them. So full remat must save at
least one block's probabilities. Two blocks a tower (SAM: one windowed, one global, as the real tower
alternates), 4 images, the tiny widths; SAM with the reference attention (it materializes the probabilities
the bound counts). This caught SAM's blocks, called in a Python loop, losing their remat to XLA's CSE (temp
unchanged, 16.37 MB both ways, until `maybe_remat(..., scanned=False)` set prevent_cse).
The direction is a property of this layout's memory plan, not a law: with two GLOBAL SAM blocks at these widths
the plan's peak lies elsewhere and full remat raises SAM's temp (14.1 -> 16.0 MB, libtpu 0.0.42.1).
`make test` compiles SigLIP (~4 s) and checks SAM's prevent_cse in a trace (~0.5 s); SAM's two compiles (~16 s
on 2 busy cores) are `make test-heavy`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from jax.sharding import SingleDeviceSharding

from dsvl_jax import config as C
from dsvl_jax.models.sam import SamTower
from dsvl_jax.models.siglip import SiglipTower
from dsvl_jax.train.aot import describe_topology

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # only compiling: share libtpu with other processes

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")

IMAGES = 4


@pytest.fixture(autouse=True)
def no_persistent_cache():
    """A TPU executable cannot be read back on this host (no TPU client): writing it to the tests' compilation
    cache only costs time."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", before)
TINY = C.tiny()
SAM = dataclasses.replace(TINY.sam, num_hidden_layers=2, global_attn_indexes=(1,))
SIGLIP = dataclasses.replace(TINY.siglip, num_hidden_layers=2)


def tower_temp_bytes(module: nn.Module, image_size: int) -> int:
    """Temp bytes of jit(grad(mean(tower(pixels)²))) compiled for one v5p chip."""
    devices, _, _ = describe_topology("v5p:2x2x1", use_chips=1)
    on_chip = SingleDeviceSharding(devices[0])
    pixels = jax.ShapeDtypeStruct((IMAGES, image_size, image_size, 3), jnp.float32, sharding=on_chip)
    params = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), jnp.zeros(pixels.shape))))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_chip), params)
    loss = lambda p, x: jnp.mean(jnp.square(module.apply(p, x)))
    return jax.jit(jax.grad(loss)).lower(params, pixels).compile().memory_analysis().temp_size_in_bytes


def probabilities_bytes(heads: int, tokens: int) -> int:
    return IMAGES * heads * tokens * tokens * 4


@pytest.mark.heavy  # 2 SAM compiles, ~16 s on 2 busy cores; make test checks its cause below, in a trace
@pytest.mark.tpu_aot
@needs_libtpu
def test_full_remat_of_sam_lowers_its_compiled_temp_memory():
    sam = lambda policy: SamTower(SAM, TINY.hd_output_size, "reference", remat_policy=policy)
    none, full = tower_temp_bytes(sam("none"), SAM.image_size), tower_temp_bytes(sam("full"), SAM.image_size)
    # the global block's probabilities: every image, every head, grid² x grid² tokens
    assert none - full >= probabilities_bytes(SAM.num_attention_heads, SAM.grid ** 2), (none, full)


@pytest.mark.tpu_aot
@needs_libtpu
def test_full_remat_of_siglip_lowers_its_compiled_temp_memory():
    none = tower_temp_bytes(SiglipTower(SIGLIP), SIGLIP.image_size)
    full = tower_temp_bytes(SiglipTower(SIGLIP, remat_policy="full"), SIGLIP.image_size)
    assert none - full >= probabilities_bytes(SIGLIP.num_attention_heads, SIGLIP.num_patches), (none, full)


def test_sam_remat_is_kept_apart_from_the_forward():
    """What the heavy SAM test above needs, in the trace: each of SAM's blocks (a Python loop, not a scan) is
    rematerialized with prevent_cse, else XLA merges the backward's recomputation into the forward."""
    module = SamTower(SAM, TINY.hd_output_size, "reference", remat_policy="full")
    pixels = jnp.zeros((1, SAM.image_size, SAM.image_size, 3))
    params = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), pixels)))
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, x: jnp.mean(jnp.square(module.apply(p, x)))))(params, pixels)
    remats = [e for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith("remat")]
    assert len(remats) == SAM.num_hidden_layers and all(e.params["prevent_cse"] for e in remats), remats
