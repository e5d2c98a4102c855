"""Multi-slice meshes: `make_mesh(..., slices=N)` puts the data axis across slices (slice-major) and keeps
fsdp and tensor inside one slice; the logical rules table is the same, so params never shard over slices
(only replicated across them) and the batch goes over (data, fsdp). Bad sizes fail with a clear message.

On 8 CPU devices in one process the slices are simulated in device order; the TPU case (libtpu's
description of 2 x v5p:2x2x1, whose devices carry `slice_index`) checks `create_hybrid_device_mesh`'s layout.
"""
from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest

from dsvl_jax import config as C
from dsvl_jax import sharding
from dsvl_jax.state import param_shardings
from dsvl_jax.train import validate
from dsvl_jax.train.config_files import load_config


def test_two_simulated_slices_put_data_across_slices_and_fsdp_inside():
    devices = jax.devices()
    mesh = sharding.make_mesh(1, -1, 1, devices=devices, slices=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    # slice 0 = the first four devices, all at data index 0: fsdp never leaves a slice
    assert [d.id for d in mesh.devices[0].reshape(-1)] == [d.id for d in devices[:4]]
    assert [d.id for d in mesh.devices[1].reshape(-1)] == [d.id for d in devices[4:]]
    assert sharding.mesh_slice_of(mesh, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # data=2 inside each of 2 slices: data axis 4, slice-major
    mesh = sharding.make_mesh(2, 2, 1, devices=devices, slices=2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sharding.mesh_slice_of(mesh, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_rules_shard_params_inside_a_slice_and_the_batch_over_all():
    mesh = sharding.make_mesh(1, -1, 1, slices=2)
    specs = sharding.describe(param_shardings(C.tiny(), mesh)[0])
    assert specs and not any("data" in s for s in specs.values()), "a param is sharded across slices"
    assert any("fsdp" in s for s in specs.values())
    assert sharding.batch_sharding(mesh, 2).spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(slices=3), r"slices=3 does not divide the 8 devices"),
    (dict(slices=0), r"slices=0: must be a positive integer"),
    (dict(slices=2, fsdp=3, data=-1), r"does not divide 4 devices of one slice \(of 2\)"),
    (dict(slices=2, fsdp=8, data=1), r"fsdp=8 .* does not match the 4 available devices of one slice"),
])
def test_bad_slice_sizes_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(**kwargs)


def test_config_validation_counts_devices_per_slice():
    c = load_config("configs/tiny.py:stage2")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.slices = 1, -1, 1, 3
    with pytest.raises(validate.ConfigError, match=r"config.mesh.slices=3"):
        validate.check(c)
    c.mesh.slices, c.mesh.fsdp = 2, 8
    with pytest.raises(validate.ConfigError, match=r"of one slice \(slices=2\)"):
        validate.check(c)
    c.mesh.fsdp = -1  # valid: validation goes past the mesh to the (here empty) data sources
    with pytest.raises(validate.ConfigError, match=r"config.data.sources is empty"):
        validate.check(c)


@pytest.mark.tpu_aot
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_tpu_slices_follow_slice_index():
    from jax.experimental import topologies
    devices = list(topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1", num_slices=2).devices)
    mesh = sharding.make_mesh(1, -1, 1, devices=devices, slices=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    by_slice = [{d.slice_index for d in mesh.devices[i].reshape(-1)} for i in range(2)]
    assert by_slice == [{0}, {1}]
    assert sharding.mesh_slice_of(mesh, 2).tolist() == [d.slice_index for d in mesh.devices.reshape(-1)]
    with pytest.raises(ValueError, match=r"slices=4: the 8 devices are in 2 slice"):
        sharding.make_mesh(1, -1, 1, devices=devices, slices=4)


def test_cpu_processes_stand_for_slices_but_one_tpu_slice_is_not_two():
    """CPU devices under jax.distributed all report slice_index 0: one process a slice there (the two-process
    test). A TPU slice whose hosts are two processes is still one slice: asking for two is an error."""
    from types import SimpleNamespace as D
    cpu = [D(id=i, platform="cpu", slice_index=0, process_index=i // 4) for i in range(8)]
    groups, by = sharding.slice_groups(cpu, 2)
    assert by == "process" and [[d.id for d in g] for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    tpu = [D(id=i, platform="tpu", slice_index=0, process_index=i // 4) for i in range(8)]
    with pytest.raises(ValueError, match="slices=2: the 8 devices are in 1 slice"):
        sharding.slice_groups(tpu, 2)
