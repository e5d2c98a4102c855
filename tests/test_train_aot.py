"""tools/aot_compile.py: the tiny config's train step compiles for a v5p slice through libtpu on this CPU host,
and the memory plan and FLOP figures it reports hold up. Skips when libtpu is absent."""
from __future__ import annotations

import importlib.util
import math
import os

import jax
import numpy as np
import pytest

from dsvl_jax.state import abstract_state
from dsvl_jax.train import aot
from dsvl_jax.train.config_files import load_config

# Only compiling: let several processes load libtpu (else its lockfile makes concurrent runs fail).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed"),
]

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def tiny_stage2():
    """configs/tiny.py:stage2 cut to 2 SAM blocks (one windowed, one global) and one LM layer: every code
    path still compiles, in a fraction of the time."""
    config = load_config(TINY + ":stage2")
    config.model.sam.num_hidden_layers = 2
    config.model.sam.global_attn_indexes = (1,)
    config.model.text.num_hidden_layers = 1
    return config


def _shard_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def test_tiny_train_step_compiles_for_v5p_with_memory_and_flops():
    config = tiny_stage2()
    plan = aot.compile_plan(config, "v5p:2x2x1", (1, -1, 1), batch=8, seq_len=96, sam_impl="blockwise",
                             count_jaxpr=False)
    assert (plan.chips, plan.devices, plan.mesh["fsdp"]) == (4, 4, 4)
    # Every chip holds its shards of the state and of the batch as arguments (TPU tiling may pad them).
    from dsvl_jax import sharding
    from dsvl_jax.train import stages, validate
    from dsvl_jax.train.optimizer import make_optimizer
    from dsvl_jax.state import param_shardings
    devices, _, _ = aot.describe_topology("v5p:2x2x1")
    mesh = sharding.make_mesh(1, -1, 1, devices=devices)
    cfg = validate.model_config(config).replace(sam_attention_impl="blockwise")
    mask = stages.trainable_mask(param_shardings(cfg, mesh)[1], stages.patterns_for(2))
    tx, _ = make_optimizer(config.optimizer, config.total_steps, mask)
    state = abstract_state(cfg, mesh, tx, mask)
    batch = aot.abstract_batch(cfg, mesh, 8, 96, config.data.max_images_per_row, False)
    assert plan.argument_gib * 2 ** 30 >= _shard_bytes(state) + _shard_bytes(batch)
    assert plan.temp_gib > 0 and plan.fits and plan.total_gib < plan.hbm_gib == 95
    assert plan.alias_gib > 0  # the state is donated, as the trainer donates it
    # XLA's figure is per chip, scaled to the slice; it counts each loop body once, so it is below the
    # trip-count-aware analytic count of this scanned model, but of the same order.
    assert 0.2 * plan.hardware_flops < plan.xla_flops < plan.hardware_flops
    assert plan.model_flops_causal < plan.model_flops <= plan.hardware_flops
    assert plan.peak_flops_per_device == 459e12  # v5p: 459 TFLOP/s bf16 per chip (Cloud TPU's figure)
    # the step time the tool quotes for 50% MFU reads as 50% through the trainer's own MFU meter
    from dsvl_jax.train.flops import mfu
    assert mfu(plan.model_flops, plan.step_time_for_mfu(0.5), plan.devices, 459e12) == pytest.approx(0.5)
    text = aot.format_plan(plan, step_time=1.0)
    assert "fits" in text and "MFU" in text


@pytest.mark.heavy  # the 4-chip test below checks the kernel inside the (sharded) train step in make test
def test_sam_pallas_kernel_compiles_inside_the_train_step_on_one_chip():
    plan = aot.compile_plan(tiny_stage2(), "v5p:2x2x1", (1, 1, 1), batch=2, seq_len=96,
                             sam_impl="pallas", count_jaxpr=False, use_chips=1)
    assert plan.devices == 1 and plan.fits
    hlo = plan.compiled.as_text()
    assert "relpos_flash_fwd" in hlo  # SAM is frozen: its global blocks run the forward kernel only


def test_sam_pallas_kernel_runs_per_shard_inside_the_sharded_train_step():
    """The Mosaic kernel runs per shard (shard_map over images and heads) inside a 4-chip train step: each
    chip's kernel call holds a quarter of the images, and the donated state comes back sharded as it went in."""
    config = tiny_stage2()
    batch, chips = 8, 4
    plan = aot.compile_plan(config, "v5p:2x2x1", (1, -1, 1), batch=batch, seq_len=96, sam_impl="pallas",
                             count_jaxpr=False)
    assert plan.devices == chips and plan.fits and plan.alias_gib > 0
    from dsvl_jax.train import validate
    sam = validate.model_config(config).sam
    images = batch * config.data.max_images_per_row
    tokens = sam.grid ** 2  # a global block attends over the whole grid, padded to whole 128-token blocks
    block = f"[{images // chips * sam.num_attention_heads},{-(-tokens // 128) * 128},{sam.head_dim}]"
    calls = [line for line in plan.compiled.as_text().splitlines()
             if "custom-call(" in line and "relpos_flash_fwd" in line]
    assert calls and all(block in line.split("custom-call(")[0] for line in calls), (block, calls[:1])
    state_in, state_out = plan.compiled.input_shardings[0][0], plan.compiled.output_shardings[0]
    assert jax.tree.structure(state_in) == jax.tree.structure(state_out)
    shapes = jax.tree.leaves(plan.compiled.out_info[0])
    for a, b, x in zip(jax.tree.leaves(state_in), jax.tree.leaves(state_out), shapes, strict=True):
        assert a.is_equivalent_to(b, len(x.shape)), (a, b)
    assert any(not a.is_fully_replicated for a in jax.tree.leaves(state_out))  # the state is really sharded


def test_bad_arguments_name_the_flag():
    config = load_config(TINY + ":stage2")
    with pytest.raises(SystemExit, match="--topology"):
        aot.describe_topology("v9z:2x2")
    with pytest.raises(SystemExit, match="--mesh"):
        aot.parse_mesh("data=1,model=2", config)
    with pytest.raises(SystemExit, match="--batch 6"):
        aot.compile_plan(config, "v5p:2x2x1", (1, -1, 1), batch=6, sam_impl="blockwise")
    with pytest.raises(SystemExit, match="--config configs/nope.py:stage1: no file"):
        aot.main(["--config", "configs/nope.py:stage1", "--topology", "v5p:2x2x1"])


def test_help_figures_are_those_of_the_flop_count(capsys):
    """The 7B figures the --help text quotes (model FLOPs of a stage-2 step at the paper's batch, the step time
    50% MFU needs on 128 v5p chips) are what dsvl_jax.train.flops and its MFU meter give for that config."""
    import re

    from dsvl_jax.data.transforms import DEFAULT_TASKS
    from dsvl_jax.train import flops, stages, validate
    with pytest.raises(SystemExit) as e:
        aot.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse re-wraps the lines
    model, causal = (float(x) for x in re.search(r"model ([0-9.]+e\d+) \(causal-halved ([0-9.]+e\d+)", text).groups())
    seconds = float(re.search(r"50% MFU on 128 chips needs ([0-9.]+) s a step", text).group(1))
    config = load_config(os.path.join(os.path.dirname(TINY), "deepseek_vl_7b.py") + ":stage2")
    rows, seq_len, slots = 2304, 4096, 4  # "2,304 rows x 4,096 tokens, 4 image slots a row"
    assert (config.batch_size, config.seq_len) == (rows, seq_len)
    count = flops.train_flops_per_step(
        validate.model_config(config), batch_rows=rows, seq_len=seq_len, images_per_step=rows * slots,
        trainable_patterns=stages.patterns_for(2, tuple(config.trainable)), text_only=False,
        loss_chunk=config.loss_chunk, sam_impl="blockwise",
        num_tasks=1 + len(DEFAULT_TASKS) + len([t for t in config.data.tasks if t not in DEFAULT_TASKS]))
    assert count["total"] == pytest.approx(model, rel=5e-4)  # quoted to 4 significant digits
    assert count["total_causal"] == pytest.approx(causal, rel=5e-4)
    assert flops.mfu(count["total"], seconds, 128, 459e12) == pytest.approx(0.5, rel=5e-3)  # 3 digits
