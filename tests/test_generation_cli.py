"""`dsvl-chat` on a tiny checkpoint with a BPE tokenizer trained in the test and real PIL images: the
streamed answer and the --json token ids equal `VLM.generate` on the Processor's batch; an interactive
session driven through stdin keeps the history, attaches images and survives bad ones; bad input
fails with exit status 2 and a message before anything compiles."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dsvl_jax import config as C
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.generation import chat_cli
from dsvl_jax.processing.chat import IMAGE_TAG
from dsvl_jax.processing.processor import Processor
from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer, sample_corpus
from tests.helpers import torch_ref as R
from tests.helpers.compile_counter import CompileCounter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    cfg = C.tiny()
    ckpt = tmp_path_factory.mktemp("chat_ckpt")
    R.save_hf(R.hf_model(cfg, seed=7, std=0.2), str(ckpt))
    tokenizer = build_bpe_tokenizer(sample_corpus(300), cfg.text.vocab_size, str(ckpt))
    assert tokenizer.image_token_id == cfg.image_token_id
    images = tmp_path_factory.mktemp("chat_images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(images / "wide.png")
    yy, xx = np.mgrid[:50, :30]
    Image.fromarray(np.stack([yy * 5, xx * 8, (xx + yy) * 3], -1).astype(np.uint8)).save(images / "tall.jpg")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return str(ckpt), images, load_pretrained(str(ckpt)), tokenizer


def run_cli(argv, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    rc = chat_cli.main(argv, stdin=io.StringIO(stdin), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def expected_ids(vlm, tokenizer, conversation, max_new):
    """What the library gives for the same conversation: Processor batch → VLM.generate, cut at EOS."""
    batch = Processor(tokenizer, vlm.config)(conversation)
    ids = vlm.generate(batch["input_ids"], pixel_values=batch["pixel_values"],
                       high_res_pixel_values=batch["high_res_pixel_values"], attention_mask=batch["attention_mask"],
                       max_new_tokens=max_new, eos_token_id=tokenizer.eos_id)[0].tolist()
    return ids[:ids.index(tokenizer.eos_id) + 1] if tokenizer.eos_id in ids else ids


def answer_of(tokenizer, ids):
    return tokenizer.decode([i for i in ids if i != tokenizer.eos_id]).strip()


def test_answer_streams_what_generate_gives(chat_dir):
    ckpt, images, vlm, tok = chat_dir
    question = "What is in the picture?"
    rc, out, err = run_cli(["--ckpt", ckpt, "--image", str(images / "wide.png"), "--max-new-tokens", "12", question])
    assert rc == 0, err
    conversation = [{"role": "User", "content": IMAGE_TAG + question, "images": [str(images / "wide.png")]},
                    {"role": "Assistant", "content": ""}]
    ids = expected_ids(vlm, tok, conversation, 12)
    assert len(ids) >= 4
    assert out == answer_of(tok, ids) + "\n"


def test_json_has_token_ids_and_timings(chat_dir):
    ckpt, images, vlm, tok = chat_dir
    question = f"Compare {IMAGE_TAG} and {IMAGE_TAG} please."
    rc, out, err = run_cli(["--ckpt", ckpt, "--image", str(images / "wide.png"), "--image", str(images / "tall.jpg"),
                            "--max-new-tokens", "10", "--json", question])
    assert rc == 0, err
    record = json.loads(out)
    conversation = [{"role": "User", "content": question,
                     "images": [str(images / "wide.png"), str(images / "tall.jpg")]},
                    {"role": "Assistant", "content": ""}]
    assert record["token_ids"] == expected_ids(vlm, tok, conversation, 10)
    assert record["answer"] == answer_of(tok, record["token_ids"])
    t = record["timings"]
    assert t["compile_s"] >= 0 and t["prefill_s"] > 0
    if len(record["token_ids"]) > 1:
        assert t["decode_tokens_per_s"] > 0


def test_sampling_flags_are_reproducible(chat_dir):
    ckpt, images, vlm, tok = chat_dir
    argv = ["--ckpt", ckpt, "--image", str(images / "tall.jpg"), "--max-new-tokens", "10", "--json",
            "--temperature", "0.9", "--top-p", "0.9", "--top-k", "50", "Say something."]
    first = json.loads(run_cli(argv + ["--seed", "4"])[1])
    again = json.loads(run_cli(argv + ["--seed", "4"])[1])
    other = json.loads(run_cli(argv + ["--seed", "5"])[1])
    assert first["token_ids"] == again["token_ids"]
    assert first["token_ids"] != other["token_ids"]


def test_interactive_session_keeps_history_and_images(chat_dir):
    ckpt, images, vlm, tok = chat_dir
    wide, tall, broken = (str(images / n) for n in ("wide.png", "tall.jpg", "broken.png"))
    script = "\n".join([f"/image {wide}", "What is it?", f"/image {broken}", f"/image {tall}",
                        f"And this one {IMAGE_TAG}?", "/nonsense", "/reset", "Hello there", "/quit",
                        "never read"]) + "\n"
    rc, out, err = run_cli(["--ckpt", ckpt, "--max-new-tokens", "8", "--json"], stdin=script)
    assert rc == 0, err
    turns = [json.loads(line) for line in out.splitlines()]
    assert len(turns) == 3
    assert "broken.png" in err and "unknown command" in err

    first = [{"role": "User", "content": IMAGE_TAG + "What is it?", "images": [wide]}]
    assert turns[0]["token_ids"] == expected_ids(vlm, tok, first + [{"role": "Assistant", "content": ""}], 8)
    assert turns[0]["answer"]
    second = first + [{"role": "Assistant", "content": turns[0]["answer"]},
                      {"role": "User", "content": f"And this one {IMAGE_TAG}?", "images": [tall]},
                      {"role": "Assistant", "content": ""}]
    assert turns[1]["token_ids"] == expected_ids(vlm, tok, second, 8)
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"] + vlm.config.num_image_tokens
    third = [{"role": "User", "content": "Hello there"}, {"role": "Assistant", "content": ""}]
    assert turns[2]["token_ids"] == expected_ids(vlm, tok, third, 8)
    assert turns[2]["prompt_tokens"] < turns[0]["prompt_tokens"]


def test_bad_input_fails_before_compiling(chat_dir, tmp_path):
    ckpt, images, vlm, tok = chat_dir
    wide = str(images / "wide.png")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text(open(os.path.join(ckpt, "config.json")).read())
    cases = [
        (["--image", str(images / "missing.png"), "q"], "missing.png: file not found"),
        (["--image", str(images / "broken.png"), "q"], "broken.png"),
        (["--image", wide, "--image", wide, f"{IMAGE_TAG} one tag"], "1 <image_placeholder> tag(s) but 2 image(s)"),
        ([f"{IMAGE_TAG} a tag, no image"], "1 <image_placeholder> tag(s) but 0 image(s)"),
        (["word " * 600], "exceed the model context"),
        (["--temperature", "0.5", "--top-p", "2", "q"], "top_p=2.0"),
        (["--max-new-tokens", "0", "q"], "--max-new-tokens=0"),
    ]
    with CompileCounter() as counter:
        for argv, message in cases:
            rc, out, err = run_cli(["--ckpt", ckpt] + argv)
            assert rc == chat_cli.EXIT_BAD_INPUT and message in err and out == "", (argv, err)
        rc, out, err = run_cli(["--ckpt", str(tmp_path / "nowhere"), "q"])
        assert rc == 2 and "no such directory" in err
        rc, out, err = run_cli(["--ckpt", str(no_tokenizer), "q"])
        assert rc == 2 and "tokenizer" in err
    assert counter.count == 0


def test_entry_point_reports_bad_image(chat_dir):
    ckpt, images, vlm, tok = chat_dir
    proc = subprocess.run([sys.executable, "-m", "dsvl_jax.generation.chat_cli", "--ckpt", ckpt, "--image",
                           str(images / "missing.png"), "hi"], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 2
    assert "dsvl-chat: error:" in proc.stderr and "missing.png: file not found" in proc.stderr
