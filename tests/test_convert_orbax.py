"""The Orbax training-checkpoint contract: a trainer-style workdir (state = step + params + optax state,
data = Grain iterator state, params sharded on a mesh) converts params-only, onto the host, from any of
its three paths and at any step; written checkpoints resume in a trainer on another mesh."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from dsvl_jax import config as C
from dsvl_jax import sharding
from dsvl_jax.convert import orbax_io
from dsvl_jax.convert.cli import main as cli
from dsvl_jax.convert.load import load_pretrained
from tests.test_convert_roundtrip import assert_same_params, flat, our_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """Steps 1 and 2 of a 'training run' on a (1, 2, 2) mesh of 4 of the 8 devices, saved as the trainer will.
    (Orbax's first save of a sharded state compiles a slice per shard on CPU: the SigLIP-only model and 4
    devices keep that to seconds.)"""
    import grain
    from dsvl_jax.state import abstract_params
    cfg, params = our_params(C.tiny(hybrid=False), "float32", seed=11)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    params = jax.device_put(params, sharding.param_shardings(abstract_params(cfg), mesh))
    assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(params))
    tx = optax.adamw(1e-3)

    @jax.jit  # one program for the whole tree (op-by-op dispatch on 8 devices is slow)
    def train_step(params, opt_state):
        updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = jax.jit(tx.init)(params)
    workdir = str(tmp_path_factory.mktemp("run"))
    orbax_io.write_model_config(workdir, cfg)
    it = iter(grain.MapDataset.range(16).to_iter_dataset())
    saved = {}
    with orbax_io.checkpoint_manager(workdir) as mngr:
        for step in (1, 2):
            params, opt_state = train_step(params, opt_state)
            next(it)
            mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(orbax_io.train_state(step, params, opt_state)),
                data=grain.checkpoint.CheckpointSave(it)))
            saved[step] = flat(params)
        mngr.wait_until_finished()
    return cfg, workdir, saved


def test_params_only_from_workdir_checkpoints_dir_and_step_dir(train_run):
    cfg, workdir, saved = train_run
    paths = {None: workdir, 2: os.path.join(workdir, "checkpoints"), 1: os.path.join(workdir, "checkpoints", "1")}
    for step, path in paths.items():
        got_cfg, params = orbax_io.load_orbax_params(path)
        assert got_cfg == cfg
        want = saved[step or 2]  # latest step by default
        got = flat(params)
        assert all(type(v) is np.ndarray for v in got.values())  # on the host, not on the saving mesh
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].tobytes() == want[k].tobytes() and got[k].dtype == want[k].dtype, k
    assert any(saved[1][k].tobytes() != saved[2][k].tobytes() for k in saved[1])  # the steps differ


def test_config_json_in_the_checkpoints_dir_is_accepted(train_run, tmp_path):
    cfg, workdir, saved = train_run
    ck = tmp_path / "checkpoints"  # no workdir/model_config.json beside it
    shutil.copytree(os.path.join(workdir, "checkpoints"), ck)
    with open(ck / "config.json", "w") as f:
        json.dump(cfg.to_dict(), f)
    got_cfg, params = orbax_io.load_orbax_params(str(ck))
    assert got_cfg == cfg and flat(params)["language_model/norm/scale"].tobytes() == \
        saved[2]["language_model/norm/scale"].tobytes()


def test_cli_step_choice_and_hf_output(train_run, tmp_path):
    cfg, workdir, saved = train_run
    out = str(tmp_path / "hf_step1")
    assert cli([workdir, out, "--to", "hf", "--step", "1"]) == 0
    vlm = load_pretrained(out)
    got = flat(vlm.params)
    for k in saved[1]:
        assert got[k].tobytes() == saved[1][k].tobytes(), k


def test_restore_in_a_one_device_process_matches(train_run, tmp_path):
    """Saved from 4 devices on a 1x2x2 mesh, read back by a process that has a single CPU device."""
    _, workdir, saved = train_run
    code = (f"import sys, hashlib; sys.path.insert(0, {REPO!r})\n"
            "import jax, numpy as np\n"
            "from flax import traverse_util\n"
            "from dsvl_jax.convert.orbax_io import load_orbax_params\n"
            "assert jax.device_count() == 1\n"
            f"_, p = load_orbax_params({workdir!r})\n"
            "f = traverse_util.flatten_dict(p, sep='/')\n"
            "print(hashlib.sha256(b''.join(k.encode() + f[k].tobytes() for k in sorted(f))).hexdigest())\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = hashlib.sha256(b"".join(k.encode() + saved[2][k].tobytes() for k in sorted(saved[2]))).hexdigest()
    assert proc.stdout.strip().splitlines()[-1] == want


def test_written_checkpoint_resumes_in_a_trainer_on_a_mesh(tmp_path):
    """HF → Orbax gives state = {step 0, params}; the trainer restores it with StandardRestore straight onto
    a sharded mesh, and `load_orbax_params` reads it too."""
    import flax.linen as nn
    from dsvl_jax.convert.export import save_pretrained
    from dsvl_jax.state import abstract_params
    cfg, params = our_params(C.tiny(hybrid=False), "bfloat16", seed=2)
    hf = save_pretrained((cfg, params), str(tmp_path / "hf"), layout="hf")
    run = str(tmp_path / "run")
    assert cli([hf, run, "--to", "orbax"]) == 0
    # the HF folder's processor files (save_pretrained writes them) travel beside the model config
    assert sorted(os.listdir(run)) == ["chat_template.jinja", "checkpoints", "model_config.json",
                                       "processor_config.json"]
    assert orbax_io.read_model_config(os.path.join(run, "model_config.json")) == cfg
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    abstract = abstract_params(cfg)
    target = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),
              "params": jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                     nn.meta.unbox(abstract), sharding.param_shardings(abstract, mesh))}
    with orbax_io.checkpoint_manager(run) as mngr:
        assert mngr.latest_step() == 0
        state = mngr.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    assert int(state["step"]) == 0
    assert_same_params(params, state["params"])
    for x, sh in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(target["params"])):
        assert x.sharding == sh.sharding


def test_param_by_param_restore_gives_the_same_export(train_run, tmp_path):
    """Above `resident_bytes` an Orbax source is restored one param at a time while exporting (the path big
    checkpoints take); the files are byte-identical to the one-call restore's."""
    from dsvl_jax.convert.export import plan_tensors, write_folder
    from tests.test_convert_roundtrip import assert_same_tensors
    _, workdir, _ = train_run
    outs = {}
    for budget in (0, 2**30):
        src = orbax_io.OrbaxSource(workdir, resident_bytes=budget)
        assert (src._whole is None) == (budget == 0)
        plan, produce = plan_tensors(src.config, "official", src.shape_of, src.dtype_of, src.array_of)
        outs[budget] = write_folder(str(tmp_path / f"off_{budget}"), src.config, "official", plan, produce)
        if budget == 0:
            assert 0 < len(src._cache) <= 3
    assert_same_tensors(outs[0], outs[2**30])


def test_load_pretrained_reads_a_training_checkpoint(train_run):
    """`load_pretrained(workdir)` serves a training checkpoint directly: latest step, params only, keeping the
    training config; with a mesh, params land sharded by the logical rules."""
    cfg, workdir, saved = train_run
    vlm = load_pretrained(workdir)
    assert vlm.config == cfg and vlm.source == workdir
    got = flat(vlm.params)
    assert all(got[k].tobytes() == saved[2][k].tobytes() for k in saved[2])
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = load_pretrained(os.path.join(workdir, "checkpoints"), mesh=mesh, dtype="bfloat16")
    assert sharded.config.param_dtype == "bfloat16"
    leaves = jax.tree.leaves(sharded.params)
    assert {x.dtype for x in leaves} == {jnp.dtype("bfloat16")}
    assert any(not x.sharding.is_fully_replicated for x in leaves)
