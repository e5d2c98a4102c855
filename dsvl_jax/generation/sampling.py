"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

The order of operations is HF's (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`):
divide by the temperature; keep the `top_k` largest logits (exactly k: a tie at the k-th value goes
to the lower id, where HF would keep every tied token); then keep the smallest set of most probable
tokens whose probability (renormalised over what top-k left) reaches `top_p` — the most probable
token always survives; sample from what is left.

`SamplingConfig` holds what changes the compiled program (greedy or not, top-k, whether top-p is on);
the temperature and the top-p value are traced scalars, so changing them does not re-compile.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    top_k: Optional[int] = None
    use_top_p: bool = False


def check_sampling(do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Clear errors for sampling settings that have no meaning (raised before anything compiles)."""
    if not do_sample:
        return
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0 when sampling (use do_sample=False for greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: expected a positive integer or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: expected a value in (0, 1]")


def sampling_config(do_sample: bool, top_k: Optional[int], top_p: Optional[float], vocab: int) -> SamplingConfig:
    if not do_sample:
        return SamplingConfig()
    k = None if top_k is None or top_k >= vocab else int(top_k)
    return SamplingConfig(True, k, top_p is not None and top_p < 1.0)


def top_p_keep(sorted_logits, top_p):
    """For logits sorted in descending order: True where the token belongs to the top-p set, i.e. the
    probability mass of the tokens ranked above it is still below `top_p`."""
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    return mass_above < top_p


def candidates(logits, cfg: SamplingConfig, temperature, top_p):
    """What sampling draws from: (scaled logits [B, K], token ids [B, K]); -inf marks a removed token.

    K is the vocabulary, or top_k when set; with top-p the values are sorted in descending order."""
    logits = logits.astype(jnp.float32) / temperature
    ids = jnp.broadcast_to(jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape)
    if cfg.top_k is not None:
        # Exactly k candidates, in descending order (a tie at the k-th value goes to the lower id);
        # the top-p sort then only touches k values.
        values, ids = jax.lax.top_k(logits, cfg.top_k)
    elif cfg.use_top_p:
        neg, ids = jax.lax.sort_key_val(-logits, ids)
        values = -neg
    else:
        values = logits
    if cfg.use_top_p:
        values = jnp.where(top_p_keep(values, top_p), values, -jnp.inf)
    return values, ids.astype(jnp.int32)


def choose_tokens(logits, key, cfg: SamplingConfig, temperature, top_p):
    """logits [B, V] float32 → token ids [B] int32: argmax, or one draw per row from `candidates`."""
    if not cfg.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    values, ids = candidates(logits, cfg, temperature, top_p)
    choice = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
