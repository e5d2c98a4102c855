"""The train and eval steps: masked loss, gradient accumulation, frozen params, NaN/Inf guard.

The state is a plain dict so that Orbax saves it as is and the converter can restore `params` alone:
    {"step": int32, "params": full tree, "opt_state": optimizer state of the *trainable* params only,
     "bad_steps": consecutive non-finite steps, "skipped": total skipped updates}
Gradients are taken only with respect to the trainable subtree: frozen params get no gradient, no
optimizer state and pass through the update untouched (bit-identical).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from dsvl_jax.models.vlm import DeepseekVL
from dsvl_jax.state import merge_params, split_params
from dsvl_jax.train.loss import chunked_cross_entropy


def _microbatches(batch, n: int):
    """[B, ...] → [n, B/n, ...] taking rows a, a+n, a+2n… for micro-batch a (keeps data sharding even)."""
    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def forward_hidden(module: DeepseekVL, params, batch, text_only: bool):
    """The model call on a training batch (packed rows: positions and segment ids per row; image slots per row,
    dropped on a text-only step) → final hidden states [B, T, D]."""
    images = {}
    if not text_only:
        images = dict(pixel_values=batch["pixel_values"], high_res_pixel_values=batch.get("high_res_pixel_values"),
                      image_valid=batch["image_mask"])
    h, _ = module.apply({"params": params}, batch["input_ids"], positions=batch["positions"],
                        segment_ids=batch["segment_ids"], return_hidden=True, **images)
    return h


def make_loss_fn(module: DeepseekVL, num_tasks: int, loss_chunk: int, text_only: bool):
    def loss_fn(trainable, frozen, mb):
        params = merge_params(trainable, jax.lax.stop_gradient(frozen))
        h = forward_hidden(module, params, mb, text_only)
        logits_fn = lambda hc: module.apply({"params": params}, hc, method=DeepseekVL.logits_from_hidden)
        loss, cnt, tl, tc = chunked_cross_entropy(h, logits_fn, mb["targets"], mb["loss_mask"], mb.get("task_ids"),
                                                  num_tasks, chunk=loss_chunk)
        return loss, (cnt, tl, tc)
    return loss_fn


def make_train_step(module: DeepseekVL, tx: optax.GradientTransformation, mask, lr_fn, *, num_tasks: int = 1,
                    grad_accum: int = 1, loss_chunk: int = 512, text_only: bool = False):
    """(state, batch) → (state, metrics). `text_only` is static: the vision towers are not traced at all."""
    loss_fn = make_loss_fn(module, num_tasks, loss_chunk, text_only)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        trainable, frozen = split_params(state["params"], mask)
        if grad_accum == 1:
            (loss, (cnt, tl, tc)), grads = grad_fn(trainable, frozen, batch)
        else:
            def body(acc, mb):
                (l, aux), g = grad_fn(trainable, frozen, mb)
                return jax.tree.map(jnp.add, acc, ((l, aux), g)), None
            zero = ((jnp.zeros(()), (jnp.zeros(()), jnp.zeros((num_tasks,)), jnp.zeros((num_tasks,)))),
                    jax.tree.map(jnp.zeros_like, trainable))
            ((loss, (cnt, tl, tc)), grads), _ = jax.lax.scan(body, zero, _microbatches(batch, grad_accum))
        denom = jnp.maximum(cnt, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        mean_loss = loss / denom
        gnorm = optax.global_norm(grads)
        ok = jnp.isfinite(mean_loss) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # A non-finite step changes nothing but the counters (the update is skipped, not applied).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = {
            "step": state["step"] + 1,
            "params": merge_params(keep(new_trainable, trainable), frozen),
            "opt_state": keep(new_opt, state["opt_state"]),
            "bad_steps": jnp.where(ok, 0, state["bad_steps"] + 1),
            "skipped": state["skipped"] + jnp.where(ok, 0, 1),
        }
        metrics = {"loss": mean_loss, "grad_norm": gnorm, "lr": lr_fn(state["step"]), "tokens": cnt,
                   "ok": ok, "task_loss_sum": tl, "task_count": tc}
        return new_state, metrics

    return step


def make_eval_step(module: DeepseekVL, *, num_tasks: int = 1, loss_chunk: int = 512, text_only: bool = False):
    loss_fn = make_loss_fn(module, num_tasks, loss_chunk, text_only)

    def step(params, batch):
        loss, (cnt, tl, tc) = loss_fn(traverse_util.flatten_dict(params, sep="/"), {}, batch)
        return {"loss_sum": loss, "tokens": cnt, "task_loss_sum": tl, "task_count": tc}

    return step
