"""`dsvl-convert`: bad input gets a one-line error naming the culprit, exit code 2, and nothing is written
(not even a temporary folder); a failure half-way leaves the destination as it was."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dsvl_jax import config as C
from dsvl_jax.convert import keymap, orbax_io
from dsvl_jax.convert.cli import main as cli
from dsvl_jax.convert.cli import parse_size
from tests.helpers import torch_ref as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny hybrid as a transformers-written HF folder, its official twin and its Orbax twin."""
    root = tmp_path_factory.mktemp("sources")
    hf = str(root / "hf")
    R.hf_model(C.tiny(), seed=5).save_pretrained(hf)
    assert cli([hf, str(root / "official"), "--to", "official"]) == 0
    assert cli([hf, str(root / "orbax"), "--to", "orbax"]) == 0
    return {"hf": hf, "official": str(root / "official"), "orbax": str(root / "orbax")}


def fails(capsys, argv, *fragments, where):
    """Runs the CLI, expects exit code 2 with a one-line message holding `fragments`, and `where` untouched."""
    before = sorted(os.listdir(where))
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dsvl-convert: error: "), err
    for f in fragments:
        assert f in err, (f, err)
    assert sorted(os.listdir(where)) == before  # nothing written, no temporary folder left behind
    return err


def test_source_that_does_not_exist(tmp_path, capsys):
    fails(capsys, [str(tmp_path / "nope"), str(tmp_path / "out"), "--to", "hf"], "nope", "does not exist",
          where=str(tmp_path))


def test_directory_without_weights(tmp_path, capsys, sources):
    (tmp_path / "empty").mkdir()
    fails(capsys, [str(tmp_path / "empty"), str(tmp_path / "out"), "--to", "hf"], "empty", "no checkpoint found",
          where=str(tmp_path))
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    shutil.copy(os.path.join(sources["hf"], "config.json"), cfg_only)
    fails(capsys, [str(cfg_only), str(tmp_path / "out"), "--to", "official"], "cfg_only", "model.safetensors",
          where=str(tmp_path))


def test_mixed_layouts(tmp_path, capsys, sources):
    # official config.json over HF-named tensors
    mixed = tmp_path / "mixed"
    shutil.copytree(sources["hf"], mixed)
    shutil.copy(os.path.join(sources["official"], "config.json"), mixed / "config.json")
    fails(capsys, [str(mixed), str(tmp_path / "out"), "--to", "hf"], "mixed layouts", "official layout",
          "hf layout", where=str(tmp_path))
    # a PyTorch folder that also holds an Orbax checkpoint
    both = tmp_path / "both"
    shutil.copytree(sources["orbax"], both)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(sources["hf"], f), both / f)
    fails(capsys, [str(both), str(tmp_path / "out"), "--to", "hf"], "mixed layouts", "Orbax",
          where=str(tmp_path))


def test_orbax_without_params(tmp_path, capsys, sources):
    import orbax.checkpoint as ocp
    cfg, params = orbax_io.load_orbax_params(sources["orbax"])
    # a state item with a step and optimizer-like leaves, but no params
    run = tmp_path / "run"
    run.mkdir()
    orbax_io.write_model_config(str(run), cfg)
    mngr = orbax_io.checkpoint_manager(str(run), ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {"step": np.int32(3), "opt_state": {"mu": np.zeros(4, np.float32)}})))
    mngr.wait_until_finished()
    mngr.close()
    fails(capsys, [str(run), str(tmp_path / "out"), "--to", "hf"], "no 'params'", "opt_state", where=str(tmp_path))
    # a step folder with the data item only
    os.makedirs(tmp_path / "run2" / "checkpoints" / "5" / "data")
    orbax_io.write_model_config(str(tmp_path / "run2"), cfg)
    fails(capsys, [str(tmp_path / "run2"), str(tmp_path / "out"), "--to", "hf"], "no 'state' item",
          where=str(tmp_path))
    # a workdir without its model config
    nocfg = tmp_path / "nocfg"
    shutil.copytree(os.path.join(sources["orbax"], "checkpoints"), nocfg / "checkpoints")
    fails(capsys, [str(nocfg), str(tmp_path / "out"), "--to", "hf"], "model_config.json", where=str(tmp_path))
    # a step that is not there
    fails(capsys, [sources["orbax"], str(tmp_path / "out"), "--to", "hf", "--step", "9"], "no step 9",
          where=str(tmp_path))


def test_existing_destination(tmp_path, capsys, sources):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    fails(capsys, [sources["hf"], str(dst), "--to", "official"], "already exists", "--overwrite",
          where=str(tmp_path))
    assert os.listdir(dst) == ["keep.txt"]
    fails(capsys, [sources["hf"], os.path.join(sources["hf"], "sub"), "--to", "official", "--overwrite"],
          "overlaps the source", where=sources["hf"])
    # --overwrite replaces it whole
    assert cli([sources["hf"], str(dst), "--to", "official", "--overwrite"]) == 0
    assert "keep.txt" not in os.listdir(dst) and "model.safetensors" in os.listdir(dst)


def test_shape_that_does_not_fit_the_config(tmp_path, capsys, sources):
    bad = tmp_path / "bad"
    shutil.copytree(sources["hf"], bad)
    with open(bad / "config.json") as f:
        d = json.load(f)
    d["text_config"]["intermediate_size"] = 96
    with open(bad / "config.json", "w") as f:
        json.dump(d, f)
    fails(capsys, [str(bad), str(tmp_path / "out"), "--to", "official"], "mlp.gate_proj.weight", "(128, 64)",
          "(96, 64)", where=str(tmp_path))
    # the same for an Orbax source whose model config disagrees with its params
    run = tmp_path / "run"
    shutil.copytree(sources["orbax"], run)
    with open(run / "model_config.json") as f:
        d = json.load(f)
    d["siglip"]["intermediate_size"] = 48
    with open(run / "model_config.json", "w") as f:
        json.dump(d, f)
    fails(capsys, [str(run), str(tmp_path / "out"), "--to", "hf"], "vision/siglip/blocks/fc1/", "has shape",
          "model_config.json needs", where=str(tmp_path))


def test_bad_arguments(tmp_path, capsys, sources):
    fails(capsys, [sources["hf"], str(tmp_path / "out"), "--to", "hf", "--step", "1"], "--step", where=str(tmp_path))
    (tmp_path / "a_file").write_text("x")
    fails(capsys, [sources["hf"], str(tmp_path / "a_file" / "out"), "--to", "hf"], "a_file", "is a file",
          where=str(tmp_path))
    with pytest.raises(SystemExit) as e:  # argparse: exit code 2 as well
        cli([sources["hf"], str(tmp_path / "out"), "--to", "onnx"])
    assert e.value.code == 2
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1234") == 1234
    with pytest.raises(Exception):
        parse_size("5 parsecs")


@pytest.mark.parametrize("to", ["official", "orbax"])
def test_failure_half_way_leaves_nothing_and_keeps_an_old_destination(tmp_path, monkeypatch, capsys, sources, to):
    """A crash after part of the destination is written (PyTorch: the 40th tensor; Orbax: after the
    checkpoint, while copying side files): no destination, no temporary folder, no parent folder it
    created; with --overwrite the old destination survives intact."""
    from dsvl_jax.convert import export
    calls = {"n": 0}

    def crash_on_40th(real):
        def f(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 40:
                raise OSError("disk on fire")
            return real(*a, **kw)
        return f

    def crash(*a, **kw):
        raise OSError("disk on fire")

    if to == "official":
        monkeypatch.setattr(keymap, "to_torch", crash_on_40th(keymap.to_torch))
    else:
        monkeypatch.setattr(export, "copy_side_files", crash)
    def fails_writing(capsys, argv):  # one line, exit code 1: the input was fine, the disk was not
        assert cli(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("dsvl-convert: error: writing ") and "disk on fire" in err

    fails_writing(capsys, [sources["hf"], str(tmp_path / "out"), "--to", to])
    assert os.listdir(tmp_path) == []
    calls["n"] = 0
    fails_writing(capsys, [sources["hf"], str(tmp_path / "new" / "deeper" / "out"), "--to", to])
    assert os.listdir(tmp_path) == []  # the parents it created went too
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    calls["n"] = 0
    fails_writing(capsys, [sources["hf"], str(old), "--to", to, "--overwrite"])
    assert os.listdir(tmp_path) == ["old"] and os.listdir(old) == ["keep.txt"]


def test_every_direction_and_the_tools_wrapper(tmp_path, sources):
    """hf/official/orbax → hf/official/orbax all succeed; the tools/ script is the same CLI."""
    for src in ("hf", "official", "orbax"):
        for to in ("hf", "official", "orbax"):
            assert cli([sources[src], str(tmp_path / f"{src}_to_{to}"), "--to", to]) == 0
    step_dir = os.path.join(sources["orbax"], "checkpoints", "0")
    assert cli([step_dir, str(tmp_path / "from_step_dir"), "--to", "hf"]) == 0
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--max-shard-size" in out.stdout


def test_processor_files_follow_the_destination_layout(tmp_path, capsys, sources):
    """An official VLChatProcessor config never lands in an HF export (AutoProcessor would fail on it), nor
    the HF one in an official export; an HF export always gets its own processor config and chat template,
    and says so when the source had no tokenizer to bring along."""
    from dsvl_jax.convert.export import processor_format
    off = tmp_path / "off"
    shutil.copytree(sources["official"], off)
    (off / "processor_config.json").write_text(json.dumps({"processor_class": "VLChatProcessor", "image_tag": "x"}))
    (off / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "VLMImageProcessor"}))
    assert cli([str(off), str(tmp_path / "hf"), "--to", "hf"]) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "no tokenizer files" in err and err.count("\n") == 1
    names = os.listdir(tmp_path / "hf")
    assert "preprocessor_config.json" not in names and "chat_template.jinja" in names
    assert processor_format(str(tmp_path / "hf" / "processor_config.json")) == "hf"
    assert cli([str(tmp_path / "hf"), str(tmp_path / "off2"), "--to", "official"]) == 0
    assert not {"processor_config.json", "preprocessor_config.json"} & set(os.listdir(tmp_path / "off2"))
    assert cli([str(off), str(tmp_path / "off3"), "--to", "official"]) == 0  # same layout: they travel
    assert processor_format(str(tmp_path / "off3" / "processor_config.json")) == "official"
    assert processor_format(str(tmp_path / "off3" / "preprocessor_config.json")) == "official"
