"""A LoRA run of the trainer on the tiny config (text-only corpus, LoRA r=4 with dropout 0.1 on the LLM's
projections, the final norm trained in full): only the adapters and the chosen full params move, the frozen base stays bit-identical
with no optimizer state, written once to lora_base (each step's checkpoint lacks it); 8 devices equal 1; stop + resume is bit-identical; the run exports as a PEFT adapter that
`peft.PeftModel.from_pretrained` loads onto transformers' model with our logits (and merged, without peft), and
the adapter imports back bit-exactly."""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util
from peft import PeftModel

from dsvl_jax import sharding
from dsvl_jax.convert import peft_io
from dsvl_jax.convert.cli import main as convert_cli
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.convert.orbax_io import load_orbax_params
from dsvl_jax.models import lora
from dsvl_jax.models.vlm import DeepseekVL
from dsvl_jax.state import init_adapters, init_params, param_shapes
from dsvl_jax.train import lora_run
from dsvl_jax.train.trainer import train
from dsvl_jax.train.validate import ConfigError, check, model_config
from tests.helpers import torch_ref as R
from tests.helpers.train_fixtures import checkpoint_state, orbax_tree, tiny_config
from tests.test_convert_transformers import hf_load

TOL = 1e-4  # float32 logits of two frameworks (as tests/test_convert_transformers.py)
FULL = "language_model/norm/scale"


def _cfg(text_corpus, **kw):
    srcs, tok = text_corpus
    base = {"total_steps": 3, "log_every": 1, "checkpoint.async_save": False, "lora.rank": 4, "lora.alpha": 8.0,
            "lora.targets": ("llm",), "lora.full": ("language_model/norm",), "lora.dropout": 0.1,
            # a large step so the adapters move well clear of the tolerances below in 3 steps
            "optimizer.lr": 0.05, "optimizer.warmup_steps": 0, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    base.update(kw)
    return tiny_config("stage3", srcs, tok, **base)


@pytest.fixture(scope="module")
def run(text_corpus, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("lora") / "run")
    summary = train(_cfg(text_corpus), wd)
    return wd, summary, checkpoint_state(wd, 3)


def _split(state, wd=None):
    """(params, adapters) of a step's state; with `wd`, the params include the run's frozen base (lora_base)."""
    params = {k[len("params/"):]: v for k, v in state.items() if k.startswith("params/")}
    adapters = {k[len("lora/"):]: v for k, v in state.items() if k.startswith("lora/")}
    if wd is not None:
        base = orbax_tree(os.path.join(wd, "lora_base"))
        params.update({k[len("params/"):]: v for k, v in base.items()})
    return params, adapters


def _bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def test_only_adapters_and_full_params_change(run, text_corpus):
    wd, _, state = run
    cfg = _cfg(text_corpus)
    mcfg = model_config(cfg)
    # each step's checkpoint holds only what trains; the frozen base is written once, apart
    assert set(_split(state)[0]) == {FULL}
    base = {k[len("params/"):] for k in orbax_tree(os.path.join(wd, "lora_base"))}
    assert base == set(param_shapes(mcfg)) - {FULL}
    print(f"step 3 state {_bytes(os.path.join(wd, 'checkpoints', '3', 'state'))} B, "
          f"lora_base {_bytes(os.path.join(wd, 'lora_base'))} B")
    params, adapters = _split(state, wd)
    mesh = sharding.make_mesh(2, 2, 2)  # the run's: its init programs come from the compilation cache
    before = traverse_util.flatten_dict(jax.device_get(init_params(mcfg, mesh, cfg.seed)), sep="/")
    assert params.keys() == before.keys()
    changed = {k for k in params if not np.array_equal(params[k], np.asarray(before[k]))}
    assert changed == {FULL}
    fresh = traverse_util.flatten_dict(jax.device_get(init_adapters(mcfg, mesh, lora_run.spec(cfg), cfg.seed + 1)),
                                       sep="/")
    assert set(adapters) == set(fresh) and len(adapters) == 14  # 7 projections × (A, B), stacked over layers
    assert all(not np.array_equal(adapters[k], fresh[k]) for k in adapters)  # B left zero, A left its init
    assert not np.any(fresh["language_model/layers/self_attn/q_proj/lora_b"])
    # optimizer state only for what is trained
    opt_paths = {k.split("/", 3)[-1] for k in state if k.startswith("opt_state/") and "/" in k[10:]}
    trained = set(adapters) | {FULL}
    assert {p for p in opt_paths if p in set(params) | set(adapters)} <= trained
    assert any(FULL in k for k in state if k.startswith("opt_state/"))
    with open(os.path.join(wd, "lora.json")) as f:
        assert json.load(f)["rank"] == 4


@pytest.mark.heavy
def test_eight_devices_equal_one(text_corpus, tmp_path):
    # At the tiny config's own peak lr (not the fixture's 0.05): Adam scales each update to ~lr whatever the
    # gradient's size, so float rounding in the sharded reductions reaches the params multiplied by lr (3e-5 at
    # 0.05, ~1e-7 here), while a different dropout mask or a mis-sharded adapter still moves them by ~lr (2e-4).
    kw = {"optimizer.lr": 2e-4}
    eight = train(_cfg(text_corpus, **kw), str(tmp_path / "eight"))
    one = train(_cfg(text_corpus, **kw, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.devices": 1}),
                str(tmp_path / "one"))
    assert abs(one["loss"] - eight["loss"]) <= 1e-5
    a, b = checkpoint_state(str(tmp_path / "eight"), 3), checkpoint_state(str(tmp_path / "one"), 3)
    for k in ("params", "lora"):
        keys = [x for x in a if x.startswith(k + "/")]
        worst = max(float(np.abs(a[x].astype(np.float64) - b[x]).max()) for x in keys)
        assert worst <= 1e-5, (k, worst)


@pytest.mark.heavy
def test_stop_and_resume_is_bit_identical(run, text_corpus, tmp_path):
    _, _, state = run
    wd = str(tmp_path / "part")
    train(_cfg(text_corpus, stop_at_step=2), wd)
    train(_cfg(text_corpus), wd)
    again = checkpoint_state(wd, 3)
    assert again.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(again[k], state[k], err_msg=k)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    wd = run[0]
    out = tmp_path_factory.mktemp("exports")
    paths = {"peft": str(out / "peft"), "base": str(out / "base"), "merged": str(out / "merged")}
    assert convert_cli([wd, paths["peft"], "--to", "peft"]) == 0
    assert convert_cli([wd, paths["base"], "--to", "hf"]) == 0
    assert convert_cli([wd, paths["merged"], "--to", "hf", "--merge"]) == 0
    return paths


def _ours(run, ids):
    wd, _, state = run
    mcfg, _ = load_orbax_params(wd)
    params, adapters = _split(state, wd)
    params = traverse_util.unflatten_dict(params, sep="/")
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=("llm",))  # no rng: no dropout (inference)
    module = DeepseekVL(mcfg)
    with_lora = np.asarray(jax.jit(lambda p, a: lora.apply(module, p, a, ids, spec=spec))(
        params, traverse_util.unflatten_dict(adapters, sep="/")))
    base = np.asarray(jax.jit(lambda p: module.apply({"params": p}, ids))(params))
    return mcfg, with_lora, base


def test_peft_adapter_and_merged_weights_give_our_logits(run, exported):
    mcfg = load_orbax_params(run[0])[0]
    ids = R.prompt_ids(mcfg, [0, 0], length=24, seed=5)
    mcfg, ours, base = _ours(run, ids)
    assert np.abs(ours - base).max() > 100 * TOL  # the adapters matter at this tolerance
    model, _ = hf_load(mcfg, exported["base"])
    peft_model = PeftModel.from_pretrained(model, exported["peft"]).eval()
    assert np.abs(R.torch_logits(peft_model, ids) - ours).max() <= TOL
    vlm = load_pretrained(run[0])  # the workdir itself (chat, eval, serve): the adapters merged in
    assert np.abs(np.asarray(vlm(ids)) - ours).max() <= 1e-5
    merged, info = hf_load(mcfg, exported["merged"])
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert np.abs(R.torch_logits(merged, ids) - ours).max() <= TOL


def test_peft_import_round_trips_bit_exactly(run, exported, text_corpus):
    wd, _, state = run
    _, adapters = _split(state)
    mcfg = load_orbax_params(wd)[0]
    spec, back = peft_io.read_peft(exported["peft"], mcfg, param_shapes(mcfg))
    assert (spec.rank, spec.alpha) == (4, 8.0)
    assert back.keys() == adapters.keys()
    for k in adapters:
        np.testing.assert_array_equal(back[k], adapters[k], err_msg=k)
    # and as a run's starting adapters (config.lora.from_peft), placed on the mesh
    cfg = _cfg(text_corpus, **{"lora.from_peft": exported["peft"]})
    placed = lora_run.initial_adapters(cfg, mcfg, sharding.make_mesh(2, 2, 2), lora_run.spec(cfg))
    for k, v in traverse_util.flatten_dict(jax.device_get(placed), sep="/").items():
        np.testing.assert_array_equal(v, adapters[k], err_msg=k)


@pytest.mark.parametrize("size", ["1p3b", "7b"])
def test_released_lora_configs_validate(size, text_corpus):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        f"deepseek_vl_{size}.py")
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("lora")
    c.data.sources, c.data.tokenizer = text_corpus
    check(c, device_count=8)
    assert lora_run.spec(c).rank == 16 and lora_run.base_patterns(c) == ("aligner/",)


@pytest.mark.parametrize("overrides,message", [
    ({"lora.rank": -1}, r"config.lora.rank=-1: expected a positive integer"),
    ({"lora.dropout": 1.0}, r"config.lora.dropout=1.0"),
    ({"lora.targets": ("nothing",)}, r"config.lora.targets entry 'nothing'"),
    ({"lora.targets": ("re:^nothing$",)}, r"config.lora.targets \['re:\^nothing\$'\] match no dense layer"),
    ({"lora.full": ("bogus",)}, r"config.lora.full entry 'bogus'"),
    ({"lora.from_peft": "/nonexistent/peft"}, r"config.lora.from_peft='/nonexistent/peft': no adapter_config.json"),
])
def test_bad_lora_config_is_rejected_before_compiling(text_corpus, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(_cfg(text_corpus, **overrides), str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd" / "checkpoints")


def test_a_lora_workdir_resumes_only_as_lora(run, text_corpus):
    with pytest.raises(ConfigError, match="checkpoint 3 of a LoRA run, and config.lora.rank=0 asks for no LoRA"):
        train(_cfg(text_corpus, **{"lora.rank": 0}), run[0])


def test_peft_export_needs_a_lora_run_and_matching_import(exported, text_corpus, tmp_path, capsys):
    assert convert_cli([exported["base"], str(tmp_path / "p"), "--to", "peft"]) == 2
    assert "--to peft reads a LoRA run's Orbax workdir" in capsys.readouterr().err
    cfg = _cfg(text_corpus, **{"lora.rank": 8, "lora.alpha": 16.0, "lora.from_peft": exported["peft"]})
    with pytest.raises(ConfigError, match=r"holds r=4, alpha=8.0 on 7 layers; config.lora asks for r=8"):
        lora_run.initial_adapters(cfg, model_config(cfg), sharding.make_mesh(2, 2, 2), lora_run.spec(cfg))
