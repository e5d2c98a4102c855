"""`dsvl-serve` on loopback (uvicorn in a thread) with a tiny random-weight checkpoint, driven by the official
`openai` client: plain and streamed completions equal `VLM.generate` on the Processor's batch, 16
concurrent clients get their solo greedy answers while being batched, stop strings and seeds behave,
bad requests get OpenAI-style 4xx errors and the server keeps serving. The real 1.3B shapes go through
the request path abstractly (jax.eval_shape, no weights)."""
import base64
import io
import json
import threading
import time

import flax.linen as nn
import httpx
import jax
import openai
import pytest
import uvicorn

from dsvl_jax import config as C
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.generation.inputs import pack_batch
from dsvl_jax.models.vlm import DeepseekVL
from dsvl_jax.processing.chat import IMAGE_TAG
from dsvl_jax.processing.processor import Processor
from dsvl_jax.processing.tokenizer import Tokenizer
from dsvl_jax.serve import cli, protocol, rows
from dsvl_jax.serve.batcher import default_buckets
from dsvl_jax.serve.text import TextAssembler
from dsvl_jax.state import abstract_params
from tests.helpers.tiny_checkpoint import picture, write_checkpoint

MODEL = "tiny-vl"
MAX_BODY_MB = 0.25


def png(seed: int, size=(40, 56)) -> bytes:
    buf = io.BytesIO()
    picture(seed, size).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, *images: bytes) -> list:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(im)}} for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("serve_ckpt"))
    write_checkpoint(ckpt)
    local = tmp_path_factory.mktemp("serve_images")
    (local / "ok.png").write_bytes(png(40))
    args = cli.build_parser().parse_args([
        "--ckpt", ckpt, "--model-name", MODEL, "--port", "0", "--max-batch", "8", "--batch-buckets", "1,8",
        "--batch-wait-ms", "50", "--max-new-tokens", "64", "--max-images", "2", "--max-body-mb", str(MAX_BODY_MB),
        "--allow-local-images", str(local), "--mesh", "none"])
    app, batcher = cli.build(args)
    batcher.start()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    vlm = load_pretrained(ckpt)
    yield {"base": base, "client": client, "vlm": vlm, "processor": Processor.from_pretrained(ckpt, config=vlm.config),
           "batcher": batcher, "local": local}
    server.should_exit = True
    thread.join(10)
    batcher.stop()


def library_answer(served, text, images, max_new):
    """The answer `VLM.generate` gives the same conversation alone (Processor batch, cut at EOS)."""
    processor, vlm = served["processor"], served["vlm"]
    tok = processor.tokenizer
    conversation = [{"role": "User", "content": IMAGE_TAG * len(images) + text, "images": list(images)},
                    {"role": "Assistant", "content": ""}]
    batch = processor(conversation)
    ids = vlm.generate(batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                       max_new_tokens=max_new, eos_token_id=tok.eos_id)[0].tolist()
    return tok.decode(rows.until_eos(ids, tok.eos_id)).lstrip(), int(batch["attention_mask"].sum())


def ask(served, messages, **kw):
    return served["client"].chat.completions.create(model=MODEL, messages=messages, **kw)


def streamed(served, messages, **kw):
    chunks = list(ask(served, messages, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish, chunks


def test_models_and_health(served):
    assert [m.id for m in served["client"].models.list()] == [MODEL]
    health = httpx.get(served["base"] + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_plain_and_streamed_completions_equal_generate(served):
    messages = user("What is in the picture?", png(0))
    r = ask(served, messages, max_tokens=12, temperature=0)
    want, prompt_tokens = library_answer(served, "What is in the picture?", [png(0)], 12)
    assert r.choices[0].message.content == want and len(want) > 3
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == prompt_tokens
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens

    text, finish, chunks = streamed(served, messages, max_tokens=12, stream_options={"include_usage": True})
    assert text == want and finish == [r.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # several pieces, not one
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices


def test_sixteen_concurrent_clients_get_their_solo_answers(served):
    requests = [(f"Question {i}: {'what colour ' * (i % 4)}is it?", [png(i, (30 + 3 * i, 50))] if i % 5 else [])
                for i in range(16)]
    solo = [ask(served, user(t, *im), max_tokens=10).choices[0].message.content for t, im in requests]
    assert len(set(solo)) == 16
    before = dict(served["batcher"].stats)
    results = [None] * 16
    barrier = threading.Barrier(16)

    def client(i):
        t, im = requests[i]
        barrier.wait()
        if i % 2:
            results[i] = streamed(served, user(t, *im), max_tokens=10)[0]
        else:
            results[i] = ask(served, user(t, *im), max_tokens=10).choices[0].message.content

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert results == solo
    stats = served["batcher"].stats
    assert stats["requests"] - before["requests"] == 16
    assert stats["batches"] - before["batches"] < 16 and stats["largest_batch"] > 1  # they were batched


def test_stop_strings_and_seeded_sampling(served):
    messages = user("Describe it.", png(3))
    full = ask(served, messages, max_tokens=16).choices[0].message.content
    stop = full[6:9]
    cut = full[:full.find(stop)]
    r = ask(served, messages, max_tokens=16, stop=[stop, "never appears"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    text, finish, _ = streamed(served, messages, max_tokens=16, stop=stop)
    assert text == cut and finish == ["stop"]

    def sample(seed):
        return ask(served, messages, max_tokens=12, temperature=0.9, top_p=0.95, seed=seed).choices[0].message.content
    assert sample(5) == sample(5)
    assert sample(6) != sample(5) or sample(7) != sample(5)


def test_local_images_only_inside_the_allowed_folder(served):
    local = served["local"]
    r = ask(served, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(local / "ok.png")}},
                                                  {"type": "text", "text": "What is it?"}]}], max_tokens=8)
    assert r.choices[0].message.content == library_answer(served, "What is it?", [png(40)], 8)[0]
    with pytest.raises(openai.BadRequestError, match="outside the folder"):
        ask(served, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}},
                                                  {"type": "text", "text": "x"}]}])


def post(served, body, raw=None):
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(served["base"] + "/v1/chat/completions", content=content,
                      headers={"Content-Type": "application/json"}, timeout=60)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    good = {"model": MODEL, "messages": user("Hi there", png(1)), "max_tokens": 4}

    def with_image_url(url):
        return dict(good, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                 {"type": "text", "text": "x"}]}])
    cases = [
        (None, b'{"model": "tiny-vl", "messages": [', 400, "invalid_json"),
        ([1, 2], None, 400, None),
        (with_image_url("data:image/png;base64,@@not base64@@"), None, 400, "invalid_base64"),
        (with_image_url(data_uri(b"these bytes are no picture")), None, 400, "image_error"),
        (with_image_url("https://example.com/cat.png"), None, 400, "invalid_image_url"),
        (dict(good, messages=user("Three?", png(1), png(2), png(3))), None, 400, "too_many_images"),
        (dict(good, messages=user("word " * 600)), None, 400, "context_length_exceeded"),
        (dict(good, model="gpt-4o"), None, 404, "model_not_found"),
        (dict(good, messages=user("x" * 300_000)), None, 413, "request_too_large"),
        (dict(good, temperature="hot"), None, 400, None),
        (dict(good, n=2), None, 400, None),
        (dict(good, messages=[]), None, 400, None),
        (dict(good, messages=good["messages"] + [{"role": "assistant", "content": "ok"}]), None, 400, None),
        (dict(good, messages=[{"role": "user", "content": [{"type": "audio"}]}]), None, 400, None),
    ]
    for body, raw, status, code in cases:
        r = post(served, body, raw)
        assert r.status_code == status, (body if raw is None else raw, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        if code:
            assert error["code"] == code, error
    assert post(served, good).json()["choices"][0]["message"]["content"]
    # above the server's cap (64 here) max_tokens is cut to it, as harnesses ask for 1024+ by default
    assert post(served, dict(good, max_tokens=10_000)).json()["usage"]["completion_tokens"] <= 64
    r = httpx.get(served["base"] + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    # The official client turns these into its exception types.
    with pytest.raises(openai.NotFoundError):
        served["client"].chat.completions.create(model="other", messages=user("x"))
    with pytest.raises(openai.BadRequestError, match="base64"):
        served["client"].chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}])
    assert ask(served, user("Still there?"), max_tokens=4).choices[0].message.content


class _BrokenModel:
    def generate(self, *args, **kwargs):
        raise RuntimeError("device lost")


def test_a_failed_batch_fails_its_requests_not_the_server(served):
    from starlette.testclient import TestClient

    from dsvl_jax.serve.app import ServeConfig, create_app
    from dsvl_jax.serve.batcher import Batcher
    processor = served["processor"]
    batcher = Batcher(_BrokenModel(), processor.tokenizer, max_batch=2).start()
    try:
        with TestClient(create_app(processor, batcher, ServeConfig(MODEL))) as client:
            for _ in range(2):  # the worker survives the first failure and answers the second request
                r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": user("Hi"), "max_tokens": 4})
                assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
                assert r.json()["error"]["type"] == "server_error"
    finally:
        batcher.stop()


def test_text_assembler_holds_back_stop_prefixes(served):
    tok = served["processor"].tokenizer
    ids = tok.encode(" the red cat sat", add_bos=False)
    eos = tok.eos_id
    full = TextAssembler(tok, eos, 64)
    assert full.feed(ids + [eos]) == "the red cat sat" and full.finish_reason == "stop"
    assert full.tokens == len(ids) + 1
    stopped = TextAssembler(tok, eos, 64, stop=["cat"])
    pieces = [stopped.add(t) for t in ids]
    pieces.append(stopped.close())
    assert "".join(pieces) == "the red " and stopped.finish_reason == "stop"
    assert all("c" not in p for p in pieces)  # "c" could have begun "cat": never sent
    short = TextAssembler(tok, eos, 2)
    assert short.feed(ids) == tok.decode(ids[:2]).lstrip() and short.finish_reason == "length"
    assert default_buckets(8) == (1, 2, 4, 8) and default_buckets(6) == (1, 2, 4, 6)


def test_messages_become_the_official_conversation():
    body = {"model": MODEL, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                     {"type": "image_url", "image_url": {"url": data_uri(png(0)), "detail": "low"}},
                                     {"type": "text", "text": " and "},
                                     {"type": "image_url", "image_url": data_uri(png(1))}]},
        {"role": "assistant", "content": "Two squares."}, {"role": "user", "content": "Why?"},
        {"role": "user", "content": [{"type": "text", "text": "Tell me."}]}]}
    chat = protocol.parse_chat(body, model=MODEL)
    assert chat.system_prompt == "Be brief." and chat.temperature == 0.0 and chat.max_tokens is None
    assert [t["role"] for t in chat.conversation] == ["User", "Assistant", "User", "Assistant"]
    assert chat.conversation[0]["content"] == f"Compare {IMAGE_TAG} and {IMAGE_TAG}"
    assert chat.conversation[0]["images"] == [png(0), png(1)]
    assert chat.conversation[2]["content"] == "Why?\nTell me." and chat.conversation[3]["content"] == ""
    # text-first clients (lmms-eval) can have the images moved in front, as DeepSeek-VL was trained
    first = protocol.parse_chat(body, model=MODEL, images_first=True)
    assert first.conversation[0]["content"] == f"{IMAGE_TAG}{IMAGE_TAG}Compare  and "
    with pytest.raises(protocol.RequestError, match="user messages"):
        protocol.parse_chat(dict(body, messages=[{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(png(0))}}]}]), model=MODEL)


def test_real_1p3b_shapes_through_the_request_path(tmp_path):
    """A two-image request for the 1.3B layout: 384 px SigLIP views, 576 tokens per image, and the model's
    forward over the packed batch traced abstractly (no weights allocated)."""
    from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer, sample_corpus
    small = build_bpe_tokenizer(sample_corpus(100), 512, str(tmp_path))  # the real vocabulary is not needed
    cfg = C.deepseek_vl_1p3b().replace(image_token_id=small.image_token_id)
    processor = Processor(Tokenizer.from_file(str(tmp_path)), cfg)
    body = {"model": "deepseek-vl-1.3b-chat", "max_tokens": 64, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png(0, (300, 500)))}},
                                     {"type": "text", "text": "Compare"},
                                     {"type": "image_url", "image_url": {"url": data_uri(png(1, (500, 200)))}}]}]}
    chat = protocol.parse_chat(body, model="deepseek-vl-1.3b-chat")
    assert chat.system_prompt == "Be brief." and chat.max_tokens == 64 and chat.temperature == 0.0
    row = rows.prepare(processor, chat.conversation, max_new_tokens=chat.max_tokens,
                       max_images=rows.default_max_images(cfg), system_prompt=chat.system_prompt)
    assert row.pixel_values.shape == (2, 3, 384, 384) and row.high_res_pixel_values is None
    assert int((row.input_ids == cfg.image_token_id).sum()) == 2 * 576
    text_only = rows.prepare(processor, protocol.parse_chat(dict(body, messages=[
        {"role": "user", "content": "Hello"}]), model="deepseek-vl-1.3b-chat").conversation, max_new_tokens=64,
                             max_images=7)
    batch = rows.stack([row, text_only], processor.tokenizer.pad_id)
    packed = pack_batch(cfg, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=64)
    assert packed.input_ids.shape[0] == 2 and packed.pixel_values.shape == (2, 3, 384, 384)
    params = nn.meta.unbox(abstract_params(cfg))

    def forward(p, ids, mask, pv, valid):
        return DeepseekVL(cfg).apply({"params": p}, ids, pixel_values=pv, image_valid=valid, attention_mask=mask)
    logits = jax.eval_shape(forward, params, packed.input_ids, packed.attention_mask, packed.pixel_values,
                            packed.image_valid)
    assert logits.shape == packed.input_ids.shape + (102400,)
    assert cfg.num_image_tokens == 576
    assert rows.default_max_images(cfg) == cfg.text.max_position_embeddings // 576  # what the context holds
