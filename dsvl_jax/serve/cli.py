"""`dsvl-serve`: an OpenAI-compatible chat completions server for a DeepSeek-VL checkpoint.

    dsvl-serve --ckpt DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="DIR's folder name", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in the picture?"}]}], max_tokens=64)

Requests that arrive together are decoded in one batch (`--max-batch`, `--batch-wait-ms`); greedy answers
(temperature 0, the default) do not depend on the batch. Errors in the arguments are one line on stderr
with exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from dsvl_jax.errors import UsageError, require_at_least_one
from dsvl_jax.models.quant import WEIGHTS
from dsvl_jax.serve.app import DEFAULT_MAX_BODY, ServeConfig, create_app
from dsvl_jax.serve.batcher import Batcher, default_buckets
from dsvl_jax.serve.model import LoadError, load

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="dsvl-serve", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (config, weights, tokenizer)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    ap.add_argument("--model-name", default=None, help="the model id clients send (default: the folder's name)")
    ap.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (default 8)")
    ap.add_argument("--batch-buckets", default=None,
                    help="batch sizes compiled, e.g. 1,8 (default: powers of two up to --max-batch)")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0,
                    help="how long a request waits for others to share its batch (default 10)")
    ap.add_argument("--max-new-tokens", type=int, default=1024,
                    help="default max_tokens, and the most a request gets (larger ones are cut to it; 1024)")
    ap.add_argument("--images-first", action="store_true",
                    help="put each user message's images in front of its text, as DeepSeek-VL was trained "
                         "(for clients that send the text first)")
    ap.add_argument("--max-images", type=int, default=None, help="images per request (default: what fits)")
    ap.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY / 2 ** 20,
                    help=f"largest request body in MiB (default {DEFAULT_MAX_BODY // 2 ** 20})")
    ap.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503 (default 256)")
    ap.add_argument("--allow-local-images", metavar="DIR", default=None,
                    help="let requests name image files (paths or file:// URLs) inside DIR")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the checkpoint's")
    ap.add_argument("--weights", choices=WEIGHTS, default=None, help="fp32, bf16, or int8 (weight-only int8 LLM "
                    "linears, quantized at load); default: the checkpoint's")
    ap.add_argument("--mesh", default="auto", help="auto (all devices when several), none, or DATA,FSDP,TENSOR")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def _buckets(args) -> tuple:
    if args.batch_buckets is None:
        return default_buckets(args.max_batch)
    try:
        sizes = tuple(sorted({int(s) for s in args.batch_buckets.split(",")}))
    except ValueError:
        sizes = ()
    if not sizes or sizes[0] < 1 or sizes[-1] < args.max_batch:
        raise UsageError(f"--batch-buckets {args.batch_buckets!r}: positive sizes, the largest at least "
                         f"--max-batch {args.max_batch}")
    return sizes


def _check(args) -> None:
    require_at_least_one(args, ("max_batch", "max_new_tokens", "max_images", "max_queue"))
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port}: expected 0-65535")
    if args.max_body_mb <= 0 or args.batch_wait_ms < 0:
        raise UsageError("--max-body-mb must be > 0 and --batch-wait-ms ≥ 0")
    if args.allow_local_images is not None and not os.path.isdir(args.allow_local_images):
        raise UsageError(f"--allow-local-images {args.allow_local_images!r}: no such directory")


def build(args):
    """(app, batcher) from parsed arguments; loads the model. Raises UsageError."""
    _check(args)
    buckets = _buckets(args)
    try:
        vlm, processor = load(args.ckpt, dtype=args.dtype, mesh=args.mesh, weights=args.weights)
    except LoadError as e:
        raise UsageError(str(e)) from None
    name = args.model_name or os.path.basename(os.path.normpath(args.ckpt))
    batcher = Batcher(vlm, processor.tokenizer, max_batch=args.max_batch, buckets=buckets,
                      wait_s=args.batch_wait_ms / 1000, max_queue=args.max_queue)
    config = ServeConfig(name, max_new_tokens=args.max_new_tokens, images_first=args.images_first,
                         max_images=args.max_images, max_body_bytes=int(args.max_body_mb * 2 ** 20),
                         local_image_root=args.allow_local_images)
    return create_app(processor, batcher, config), batcher


def main(argv: Optional[list] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        app, batcher = build(args)
    except UsageError as e:
        print(f"dsvl-serve: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    batcher.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        batcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
