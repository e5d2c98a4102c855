"""`dsvl-convert` as a newcomer runs it (the real CLI in a subprocess): an Orbax training dir exported with
`--to hf` into folders that do not exist yet is a complete transformers checkpoint (`AutoProcessor` +
`AutoModelForImageTextToText` load it and generate what we generate), made with the umask's permissions;
a broken source (truncated safetensors, a missing shard, a deleted Orbax data file) is one line on stderr,
exit code 2, no traceback and no asyncio noise after it."""
import glob
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dsvl_jax import config as C
from dsvl_jax.convert.cli import main as cli
from dsvl_jax.processing.chat import format_prompt
from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer, sample_corpus
from tests.helpers import torch_ref as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What is in the picture?"


def build_checkpoints(root) -> dict:
    """A tiny hybrid as an HF folder with a BPE tokenizer (trained here), the Orbax training dir
    `dsvl-convert --to orbax` makes of it (model_config.json, checkpoints/0/state, the tokenizer copied
    beside them, as the trainer leaves a workdir) and an image."""
    cfg = C.tiny()
    hf = os.path.join(root, "hf")
    R.save_hf(R.hf_model(cfg, seed=7, std=0.2), hf)
    tokenizer = build_bpe_tokenizer(sample_corpus(300), cfg.text.vocab_size, hf)
    assert tokenizer.image_token_id == cfg.image_token_id
    orbax = os.path.join(root, "run")
    assert cli([hf, orbax, "--to", "orbax"]) == 0
    assert os.path.isfile(os.path.join(orbax, "tokenizer.json"))
    image = os.path.join(root, "wide.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(image)
    return {"cfg": cfg, "hf": hf, "orbax": orbax, "image": image, "tokenizer": tokenizer}


def run(module: str, *argv, umask=None) -> subprocess.CompletedProcess:
    # The suite's persistent compilation cache (conftest.py) serves the CLI's programs too.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               JAX_COMPILATION_CACHE_DIR=os.environ.get("DSVL_TEST_JAX_CACHE", "/tmp/dsvl_jax_test_cache"))
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300, umask=-1 if umask is None else umask)


def assert_one_line_error(proc, prog: str, *fragments, code: int = 2) -> str:
    """Exit `code`, stderr exactly one line `prog: error: ...` holding `fragments`, no traceback, no noise."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback (most recent call last)" not in proc.stderr, proc.stderr
    assert "Event loop is closed" not in proc.stderr, proc.stderr
    assert err.count("\n") == 0 and err.startswith(f"{prog}: error: "), proc.stderr
    for f in fragments:
        assert f in err, (f, err)
    return err


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return build_checkpoints(str(tmp_path_factory.mktemp("cli_convert")))


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    """`dsvl-convert RUN DST --to hf` with DST two folders below one that exists, under umask 022."""
    root = tmp_path_factory.mktemp("exports")
    dst = root / "new" / "deeper" / "hf"
    proc = run("dsvl_jax.convert.cli", ckpts["orbax"], dst, "--to", "hf", umask=0o022)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "note:" not in proc.stderr  # the tokenizer came along
    return str(root), str(dst)


def test_export_is_complete_and_made_with_the_umask(exported):
    root, dst = exported
    names = set(os.listdir(dst))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
            "chat_template.jinja"} <= names, names
    assert not [n for n in names if n.startswith(".")]
    for folder in (os.path.join(root, "new"), os.path.join(root, "new", "deeper"), dst):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755, folder
    for name in names:
        assert stat.S_IMODE(os.stat(os.path.join(dst, name)).st_mode) == 0o644, name


def test_transformers_auto_classes_load_the_export_and_generate_what_we_do(ckpts, exported):
    import torch
    import transformers

    from dsvl_jax.convert.load import load_pretrained
    from dsvl_jax.processing.processor import Processor

    _, dst = exported
    hf_proc = transformers.AutoProcessor.from_pretrained(dst)
    model = transformers.AutoModelForImageTextToText.from_pretrained(dst, dtype=torch.float32).eval()
    assert type(model).__name__ == "DeepseekVLHybridForConditionalGeneration"
    messages = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    conversation = [{"role": "User", "content": "<image_placeholder>" + QUESTION, "images": [ckpts["image"]]},
                    {"role": "Assistant", "content": ""}]
    assert text == format_prompt(conversation, system_prompt="Answer briefly.")
    image = Image.open(ckpts["image"]).convert("RGB")
    inputs = hf_proc(text=[text], images=[image], return_tensors="pt")
    ours = Processor.from_pretrained(ckpts["orbax"], system_prompt="Answer briefly.")(conversation)
    np.testing.assert_array_equal(inputs["input_ids"].numpy(), ours["input_ids"])  # same prompt, same ids

    steps = 8
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=ckpts["tokenizer"].eos_id)
    theirs = out[:, inputs["input_ids"].shape[1]:].numpy()
    assert theirs.shape == (1, steps)
    vlm = load_pretrained(ckpts["orbax"])  # the training dir itself, fed transformers' pixels
    mine = vlm.generate(inputs["input_ids"].numpy(), pixel_values=inputs["pixel_values"].numpy(),
                        high_res_pixel_values=inputs["high_res_pixel_values"].numpy(), max_new_tokens=steps)
    np.testing.assert_array_equal(np.asarray(mine), theirs)


@pytest.mark.parametrize("damage", ["truncated_safetensors", "missing_shard", "deleted_orbax_data_file"])
def test_broken_source_is_one_line_without_traceback(ckpts, tmp_path, damage):
    src = damage_copy(ckpts, str(tmp_path), damage)
    proc = run("dsvl_jax.convert.cli", src["path"], tmp_path / "out", "--to", "official")
    assert_one_line_error(proc, "dsvl-convert", *src["names"])
    assert not os.path.exists(tmp_path / "out")


def damage_copy(ckpts, root: str, damage: str) -> dict:
    """A copy of a good checkpoint with one kind of damage; `names`: what the error message must say."""
    if damage == "truncated_safetensors":
        path = shutil.copytree(ckpts["hf"], os.path.join(root, "truncated"))
        f = os.path.join(path, "model.safetensors")
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        return {"path": path, "names": ["model.safetensors", "truncated"]}
    if damage == "missing_shard":
        path = os.path.join(root, "sharded")
        assert cli([ckpts["hf"], path, "--to", "hf", "--max-shard-size", "300KB"]) == 0
        shards = sorted(glob.glob(os.path.join(path, "model-*-of-*.safetensors")))
        assert len(shards) > 2
        os.remove(shards[1])
        return {"path": path, "names": [os.path.basename(shards[1]), "missing"]}
    path = shutil.copytree(ckpts["orbax"], os.path.join(root, "run"))
    data = [f for f in glob.glob(os.path.join(path, "checkpoints", "0", "state", "**", "d", "*"), recursive=True)]
    os.remove(max(data, key=os.path.getsize))  # the file with the weights
    return {"path": path, "names": [os.path.join("checkpoints", "0", "state"), "missing or truncated"]}
