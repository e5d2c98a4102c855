"""Next-token cross-entropy over supervised positions, computed in sequence chunks so that the
[batch, length, vocab] logits never exist at once (102,400 × 4,096 fp32 logits are 1.6 GB a row)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden, logits_fn, targets, loss_mask, task_ids=None, num_tasks: int = 1,
                          chunk: int = 512):
    """hidden [B,T,D]; logits_fn(h [B,c,D]) -> [B,c,V] float32.

    Returns (loss_sum, token_count, per_task_loss_sum [num_tasks], per_task_count [num_tasks])."""
    b, t, d = hidden.shape
    chunk = min(chunk, t)
    pad = (-t) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))
        if task_ids is not None:
            task_ids = jnp.pad(task_ids, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
    tid = split(task_ids) if task_ids is not None else jnp.zeros((n, b, chunk), jnp.int32)

    @jax.checkpoint  # recompute each chunk's logits in the backward pass instead of storing them
    def chunk_loss(h, y, m, k):
        logits = logits_fn(h)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        nll = (lse - picked) * m
        onehot = jax.nn.one_hot(k, num_tasks, dtype=jnp.float32)
        return nll.sum(), m.sum(), jnp.einsum("bc,bck->k", nll, onehot), jnp.einsum("bc,bck->k", m, onehot)

    def body(carry, xs):
        out = chunk_loss(*xs)
        return jax.tree.map(jnp.add, carry, out), None

    init = (jnp.zeros(()), jnp.zeros(()), jnp.zeros((num_tasks,)), jnp.zeros((num_tasks,)))
    (loss, cnt, tl, tc), _ = jax.lax.scan(
        body, init, (split(hidden), split(targets), split(loss_mask.astype(jnp.float32)), tid))
    return loss, cnt, tl, tc
