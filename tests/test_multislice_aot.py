"""Multi-slice ahead-of-time compile through libtpu, and the reading of its cross-slice (DCN) transfers.

Compiled for N slices, XLA TPU emits one program per slice and turns the part of a collective that crosses
slices into megascale host-transfer sends (`dsvl_jax.train.hlo_collectives`). The parser is checked on a
hand-written scheduled module (trip counts from a loop condition, bytes, overlap); the compile test builds
the trainer's real step for 2 x v5p:2x2x1 (the data axis across the slices) and finds the gradient
all-reduce crossing DCN, at least each chip's shard of the LLM gradients per step.
"""
from __future__ import annotations

import importlib.util
import math

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import traverse_util

from dsvl_jax import sharding
from dsvl_jax.state import abstract_params
from dsvl_jax.train import aot, hlo_collectives, validate
from dsvl_jax.train.config_files import load_config

SCHEDULED = """HloModule m, is_scheduled=true

%cond (p: (s32[], /*index=1*/f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], /*index=1*/f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %tok = token[] after-all()
  %send.1 = (f32[8]{0:T(128)}, u32[], token[]) send(%x, %tok), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %fusion.1 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused
  %send-done.1 = token[] send-done(%send.1), channel_id=1, is_host_transfer=true
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %fusion.1)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body
  %tok2 = token[] after-all()
  %send.2 = (bf16[4,4]{1,0}, u32[], token[]) send(%y, %tok2), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_GATHER"}
  %send-done.2 = token[] send-done(%send.2), channel_id=2, is_host_transfer=true
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_parser_reads_kind_bytes_runs_and_overlap():
    rows = {t["name"]: t for t in hlo_collectives.dcn_transfers(SCHEDULED)}
    assert {k: (v["kind"], v["payload"], v["runs"], v["overlap_ops"]) for k, v in rows.items()} == {
        "send.1": ("ALL_REDUCE", 32, 6, 1), "send.2": ("ALL_GATHER", 32, 1, 0)}
    s = hlo_collectives.dcn_summary(SCHEDULED, slices=2)
    # ring over 2 slices: all-reduce 2(s-1)/s x 32 B, 6 times; all-gather (s-1) x 32 B once
    assert s["dcn_bytes_per_step"] == 6 * 32 + 32 and s["overlapped_bytes"] == 6 * 32
    assert "2 slices" in hlo_collectives.format_summary(s)


def test_a_loop_without_a_readable_trip_count_is_an_error():
    with pytest.raises(ValueError, match="trip count"):
        hlo_collectives.dcn_transfers(SCHEDULED.replace("direction=LT", "direction=NE"))


@pytest.mark.tpu_aot
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_a_batch_sum_on_the_two_slice_mesh_crosses_dcn_and_an_fsdp_sum_does_not():
    """The cheap variant: make_mesh(slices=2) over libtpu's devices; a sum over the batch (data x fsdp)
    needs a DCN all-reduce, a sum over the fsdp-sharded width alone stays inside each slice."""
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1", num_slices=2).devices
    mesh = sharding.make_mesh(1, -1, 1, devices=list(devices), slices=2)
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))
    w = jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
    batch_sum = jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, P())).lower(x).compile()
    found = hlo_collectives.dcn_transfers(batch_sum.as_text())
    assert [t["kind"] for t in found] == ["ALL_REDUCE"] and found[0]["payload"] == 256 * 4, found
    width_sum = jax.jit(lambda w: w.sum(0), out_shardings=NamedSharding(mesh, P())).lower(w).compile()
    assert hlo_collectives.dcn_transfers(width_sum.as_text()) == []


@pytest.mark.heavy
@pytest.mark.tpu_aot
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_two_slice_train_step_all_reduces_gradients_over_dcn():
    config = load_config("configs/tiny.py:stage2")
    plan = aot.compile_plan(config, "v5p:2x2x1", (1, -1, 1), slices=2, batch=16, seq_len=64, grad_accum=2,
                            text_only=True, count_jaxpr=False)
    assert plan.mesh == {"data": 2, "fsdp": 4, "tensor": 1} and plan.chips == 8
    kinds = {t["kind"] for t in plan.dcn["transfers"]}
    assert "ALL_REDUCE" in kinds, plan.dcn
    llm = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(validate.model_config(config))), sep="/")
    llm_bytes = sum(math.prod(v.shape) * 4 for k, v in llm.items() if k.startswith("language_model/"))
    reduced = sum(t["payload"] * t["runs"] for t in plan.dcn["transfers"] if t["kind"] == "ALL_REDUCE")
    assert reduced >= llm_bytes / 4, (reduced, llm_bytes)  # every chip exchanges at least its fsdp shard
