"""Load on `dsvl-serve`: N concurrent clients on loopback, with dynamic batching and with --max-batch 1.

    python benchmarks/serve_load.py [--clients 16] [--requests 8] [--max-tokens 32] [--max-batch 8]
                                    [--size tiny|small | --ckpt DIR] [--dry-run]

Without --ckpt a random-weight checkpoint (tests/helpers/tiny_checkpoint.py) is written to a temporary
folder: `tiny` is the tests' model (the 1.3B layout at ~1M parameters, 32 px images, 16 tokens per
image), where HTTP, JSON and image decoding cost more than the model, so batching has little to win;
`small` is the 1.3B layout at 1/4 width and 4 layers with the real vocabulary and 384 px / 576-token
images (~0.12B parameters), where the model's time dominates, as it does for the real ones.

For each setting the server runs as its own process (`python -m dsvl_jax.serve.cli`), is warmed up until
its batch sizes are compiled (bounded bursts, untimed), then `--clients` threads each send `--requests`
chat completions one after another (an image and a question, greedy, `--max-tokens`), all at once.
Printed per setting: requests/s, p50 and p95 latency, and generated tokens/s (the `usage.completion_tokens`
of every answer over the wall time; answers that stop at EOS early count the tokens they had).
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # for tests.helpers (the tiny checkpoint), which is not an installed package

MODEL = "bench"
WARMUP_BURSTS = 4
START_TIMEOUT_S = 300


def small_config():
    """The 1.3B layout at 1/4 width and 4 layers (benchmarks/generate_vs_torch.py's "small")."""
    from dsvl_jax import config as C

    cfg = C.VLMConfig(
        text=C.TextConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=8, head_dim=64),
        siglip=C.SiglipConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        adapter="mlp_gelu")
    return cfg.replace(image_token_id=cfg.text.vocab_size - 1)  # where the test tokenizer puts the image tag


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_uri(seed: int) -> str:
    from tests.helpers.tiny_checkpoint import picture

    buf = io.BytesIO()
    picture(seed, (48 + seed % 16, 64)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(i: int, max_tokens: int) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri(i)}},
                                     {"type": "text", "text": f"Question {i}: what does the picture show?"}]}]}


class Server:
    """`dsvl-serve` as a child process on a free loopback port."""

    def __init__(self, ckpt: str, max_batch: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        buckets = "1" if max_batch == 1 else f"1,{max_batch}"
        cmd = [sys.executable, "-m", "dsvl_jax.serve.cli", "--ckpt", ckpt, "--model-name", MODEL, "--port",
               str(self.port), "--max-batch", str(max_batch), "--batch-buckets", buckets, "--mesh", "none",
               "--log-level", "warning"]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dsvl-serve exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("dsvl-serve did not start in time")
            time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one(client: httpx.Client, url: str, payload: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=payload, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]


def burst(url: str, clients: int, requests: int, max_tokens: int) -> tuple[list, list, float]:
    """`clients` threads × `requests` sequential requests each: (latencies, tokens, wall seconds)."""
    def worker(c: int):
        out = []
        with httpx.Client() as client:
            for k in range(requests):
                out.append(one(client, url, body(c * requests + k, max_tokens)))
        return out

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(worker, range(clients)) for x in part]
    wall = time.perf_counter() - t0
    return [r[0] for r in results], [r[1] for r in results], wall


def measure(ckpt: str, max_batch: int, args) -> dict:
    server = Server(ckpt, max_batch)
    try:
        with httpx.Client() as client:  # the solo program
            one(client, server.url, body(0, args.max_tokens))
        for _ in range(WARMUP_BURSTS):  # the full-batch program (a burst may split: try a few)
            if server.health()["largest_batch"] >= min(max_batch, args.clients):
                break
            burst(server.url, args.clients, 1, args.max_tokens)
        before = server.health()
        lat, tokens, wall = burst(server.url, args.clients, args.requests, args.max_tokens)
        after = server.health()
    finally:
        server.stop()
    n = len(lat)
    batches = after["batches"] - before["batches"]
    return {"max_batch": max_batch, "requests": n, "wall_s": wall, "requests_per_s": n / wall,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "tokens_per_s": sum(tokens) / wall, "mean_tokens": sum(tokens) / n, "mean_batch": n / max(batches, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8, help="sequential requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny", help="the random model (default tiny)")
    ap.add_argument("--ckpt", default=None, help="a checkpoint folder instead of a random model")
    ap.add_argument("--dry-run", action="store_true",
                    help="the tiny model, 2 clients x 1 request of 4 tokens (what the tests run)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.clients, args.requests, args.max_tokens, args.max_batch, args.size = 2, 1, 4, 2, "tiny"
    if min(args.clients, args.requests, args.max_tokens, args.max_batch) < 1:
        ap.error("--clients, --requests, --max-tokens and --max-batch must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt
        if ckpt is None:
            from tests.helpers.tiny_checkpoint import write_checkpoint
            ckpt = os.path.join(tmp, args.size)
            write_checkpoint(ckpt, small_config() if args.size == "small" else None)
        rows = [measure(ckpt, args.max_batch, args), measure(ckpt, 1, args)]
    model = args.ckpt or f"random {args.size} model"
    print(f"{model}: {args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}, loopback")
    print(f"{'setting':<14}{'req/s':>8}{'p50 s':>8}{'p95 s':>8}{'tok/s':>9}{'mean batch':>12}")
    for r in rows:
        name = f"max-batch {r['max_batch']}"
        print(f"{name:<14}{r['requests_per_s']:>8.2f}{r['p50_s']:>8.3f}{r['p95_s']:>8.3f}{r['tokens_per_s']:>9.1f}"
              f"{r['mean_batch']:>12.1f}")
    print(f"batching speed-up: {rows[0]['requests_per_s'] / rows[1]['requests_per_s']:.2f}x requests/s")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
