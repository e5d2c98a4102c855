"""`dsvl-chat` as a newcomer runs it (the real CLI in a subprocess) and the Python path it stands for:
an Orbax training dir chats as its HF twin does; `Processor.from_pretrained(folder)` → `VLM.generate`
works from any checkpoint folder; sampling flags that cannot work are refused, the max-new-tokens note
appears only for a value the user gave; a broken checkpoint is one line, exit code 2, no traceback."""
import io
import json
import os
import shutil

import numpy as np
import pytest

from dsvl_jax.convert.cli import main as convert
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.generation import chat_cli
from dsvl_jax.processing.processor import Processor
from tests.test_cli_convert import assert_one_line_error, build_checkpoints, damage_copy, run

CHAT = "dsvl_jax.generation.chat_cli"
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return build_checkpoints(str(tmp_path_factory.mktemp("cli_chat")))


def conversation(image):
    return [{"role": "User", "content": "<image_placeholder>" + QUESTION, "images": [image]},
            {"role": "Assistant", "content": ""}]


def generate(processor, vlm, conv, max_new: int) -> list:
    batch = processor(conv)
    ids = vlm.generate(batch["input_ids"], pixel_values=batch["pixel_values"],
                       high_res_pixel_values=batch["high_res_pixel_values"], attention_mask=batch["attention_mask"],
                       max_new_tokens=max_new, eos_token_id=processor.tokenizer.eos_id)[0].tolist()
    eos = processor.tokenizer.eos_id
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def test_chat_on_an_orbax_training_dir_answers_as_its_hf_twin(ckpts):
    """Defaults (no --max-new-tokens): the answer fills what the context leaves, without a note about it."""
    proc = run(CHAT, "--ckpt", ckpts["orbax"], "--image", ckpts["image"], "--json", QUESTION)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no "max-new-tokens reduced" on a default run
    record = json.loads(proc.stdout)
    processor = Processor.from_pretrained(ckpts["hf"])
    context = ckpts["cfg"].text.max_position_embeddings
    budget = context - record["prompt_tokens"]
    assert budget < chat_cli.DEFAULT_MAX_NEW_TOKENS  # the default did have to shrink
    want = generate(processor, load_pretrained(ckpts["hf"]), conversation(ckpts["image"]), budget)
    assert record["token_ids"] == want


def test_processor_from_any_checkpoint_folder_then_generate(ckpts, tmp_path):
    """Processor.from_pretrained reads the model config of an HF folder, an Orbax workdir, its step dir and
    a dsvl-convert HF export; the batches are the same and VLM.generate answers them alike."""
    export = str(tmp_path / "export")
    assert convert([ckpts["orbax"], export, "--to", "hf"]) == 0
    step_dir = os.path.join(ckpts["orbax"], "checkpoints", "0")
    conv = conversation(ckpts["image"])
    batches = {}
    for name, folder in (("hf", ckpts["hf"]), ("orbax", ckpts["orbax"]), ("step", step_dir), ("export", export)):
        processor = Processor.from_pretrained(folder)
        assert processor.config.image_token_id == ckpts["cfg"].image_token_id
        assert processor.config.num_image_tokens == ckpts["cfg"].num_image_tokens
        batches[name] = processor(conv)
    for name, batch in batches.items():
        for key in ("input_ids", "attention_mask", "pixel_values", "high_res_pixel_values"):
            np.testing.assert_array_equal(batch[key], batches["hf"][key], err_msg=f"{name}: {key}")
    processor = Processor.from_pretrained(ckpts["orbax"])
    tokens = generate(processor, load_pretrained(ckpts["orbax"]), conv, 6)
    assert tokens == generate(processor, load_pretrained(export), conv, 6)
    with pytest.raises(FileNotFoundError, match="pass config="):
        Processor.from_pretrained(tmp_path)


@pytest.mark.parametrize("argv, fragments", [
    (["--temperature", "-1"], ["--temperature=-1.0", "must be ≥ 0"]),
    (["--top-p", "0.9"], ["--top-p", "greedy", "--temperature > 0"]),
    (["--top-k", "5"], ["--top-k", "greedy", "--temperature > 0"]),
])
def test_sampling_flags_that_cannot_work_are_refused(ckpts, argv, fragments):
    proc = run(CHAT, "--ckpt", ckpts["hf"], *argv, QUESTION)
    assert_one_line_error(proc, "dsvl-chat", *fragments)
    assert proc.stdout == ""


def test_max_new_tokens_note_only_for_a_value_the_user_gave(ckpts):
    out, err = io.StringIO(), io.StringIO()
    argv = ["--ckpt", ckpts["hf"], "--json", "--max-new-tokens", "1000", QUESTION]
    assert chat_cli.main(argv, stdin=io.StringIO(), out=out, err=err) == 0
    record = json.loads(out.getvalue())
    budget = ckpts["cfg"].text.max_position_embeddings - record["prompt_tokens"]
    assert err.getvalue().strip() == (f"note: --max-new-tokens reduced to {budget} to fit the context of "
                                      f"{ckpts['cfg'].text.max_position_embeddings} positions")


@pytest.mark.parametrize("damage", ["truncated_safetensors", "missing_shard", "deleted_orbax_data_file"])
def test_broken_checkpoint_is_one_line_without_traceback(ckpts, tmp_path, damage):
    src = damage_copy(ckpts, str(tmp_path), damage)
    if damage == "truncated_safetensors":  # the tokenizer lives beside the weights
        assert os.path.isfile(os.path.join(src["path"], "tokenizer.json"))
    proc = run(CHAT, "--ckpt", src["path"], "--image", ckpts["image"], "--max-new-tokens", "4", QUESTION)
    assert_one_line_error(proc, "dsvl-chat", *src["names"])
    assert proc.stdout == ""


def test_orbax_dir_without_its_tokenizer_says_where_to_put_it(ckpts, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(ckpts["orbax"], run_dir, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    out, err = io.StringIO(), io.StringIO()
    assert chat_cli.main(["--ckpt", str(run_dir), QUESTION], stdin=io.StringIO(), out=out, err=err) == 2
    msg = err.getvalue().strip()
    assert msg.count("\n") == 0 and "no tokenizer.json or tokenizer.model" in msg, msg
    assert f"copy the training tokenizer (tokenizer.json and tokenizer_config.json) into {run_dir}" in msg
