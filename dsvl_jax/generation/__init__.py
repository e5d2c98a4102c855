"""Decoding: `VLM.generate` with a pre-allocated KV cache, and the `dsvl-chat` CLI.

- `inputs`: checks and left-packs a prompt batch at bucketed shapes (prompt length, image count, new tokens);
- `sampling`: greedy / temperature / top-k / top-p with an explicit PRNG key;
- `engine`: the compiled prefill and decode loop (`Generator`), streaming, timings, compile counts;
- `chat_cli`: the terminal chat (`dsvl-chat`).
"""
from dsvl_jax.generation.engine import GenerationOutput, Generator, Timings
from dsvl_jax.generation.inputs import bucket_images, bucket_length, bucket_new_tokens, pack_batch
from dsvl_jax.generation.sampling import SamplingConfig, candidates, choose_tokens

__all__ = ["GenerationOutput", "Generator", "Timings", "bucket_images", "bucket_length", "bucket_new_tokens",
           "pack_batch", "SamplingConfig", "candidates", "choose_tokens"]
