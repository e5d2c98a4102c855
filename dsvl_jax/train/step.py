"""The train and eval steps: masked loss, gradient accumulation, frozen params, NaN/Inf guard.

The state is a plain dict so that Orbax saves it as is and the converter can restore `params` alone:
    {"step": int32, "params": full tree, "opt_state": optimizer state of the *trainable* params only,
     "bad_steps": consecutive non-finite steps, "skipped": total skipped updates}
Gradients are taken only with respect to the trainable subtree: frozen params get no gradient, no
optimizer state and pass through the update untouched (bit-identical). A LoRA run's state also holds
"lora", the adapters (`models/lora.py`): trained with the masked params, applied by the LoRA forward, with
the adapter dropout keyed by (seed, step, micro-batch), so a resumed run draws the same masks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from dsvl_jax.models import lora
from dsvl_jax.models.vlm import DeepseekVL
from dsvl_jax.state import merge_params, split_params, trained_params
from dsvl_jax.train.loss import chunked_cross_entropy


def _microbatches(batch, n: int):
    """[B, ...] → [n, B/n, ...] taking rows a, a+n, a+2n… for micro-batch a (keeps data sharding even)."""
    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def forward_hidden(module: DeepseekVL, params, batch, text_only: bool, lora_spec=None, rng=None):
    """The model call on a training batch (packed rows: positions and segment ids per row; image slots per row,
    dropped on a text-only step) → final hidden states [B, T, D]. With `lora_spec`, `params` holds the
    adapters too and the LoRA forward runs (adapter dropout when `rng` is given)."""
    images = {}
    if not text_only:
        images = dict(pixel_values=batch["pixel_values"], high_res_pixel_values=batch.get("high_res_pixel_values"),
                      image_valid=batch["image_mask"])
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], return_hidden=True, **images)
    if lora_spec is not None:
        h, _ = lora.apply(module, params, None, batch["input_ids"], spec=lora_spec, rng=rng, **kw)
    else:
        h, _ = module.apply({"params": params}, batch["input_ids"], **kw)
    return h


def make_loss_fn(module: DeepseekVL, num_tasks: int, loss_chunk: int, text_only: bool, lora_spec=None):
    def loss_fn(trainable, frozen, mb, rng=None):
        params = merge_params(trainable, jax.lax.stop_gradient(frozen))
        h = forward_hidden(module, params, mb, text_only, lora_spec, rng)
        logits_fn = lambda hc: module.apply({"params": params}, hc, method=DeepseekVL.logits_from_hidden)
        loss, cnt, tl, tc = chunked_cross_entropy(h, logits_fn, mb["targets"], mb["loss_mask"], mb.get("task_ids"),
                                                  num_tasks, chunk=loss_chunk)
        return loss, (cnt, tl, tc)
    return loss_fn


def make_train_step(module: DeepseekVL, tx: optax.GradientTransformation, mask, lr_fn, *, num_tasks: int = 1,
                    grad_accum: int = 1, loss_chunk: int = 512, text_only: bool = False, lora_spec=None,
                    seed: int = 0):
    """(state, batch) → (state, metrics). `text_only` is static: the vision towers are not traced at all.
    `lora_spec`: the state holds adapters ("lora"); `seed` keys their dropout."""
    loss_fn = make_loss_fn(module, num_tasks, loss_chunk, text_only, lora_spec)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    dropout = lora_spec is not None and lora_spec.dropout > 0

    def step(state, batch):
        trainable = trained_params(state["params"], mask, state.get("lora"))
        frozen = split_params(state["params"], mask)[1]
        rng = jax.random.fold_in(jax.random.key(seed), state["step"]) if dropout else None
        if grad_accum == 1:
            (loss, (cnt, tl, tc)), grads = grad_fn(trainable, frozen, batch, rng)
        else:
            def body(acc, xs):
                mb, i = xs
                (l, aux), g = grad_fn(trainable, frozen, mb, None if rng is None else jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, acc, ((l, aux), g)), None
            zero = ((jnp.zeros(()), (jnp.zeros(()), jnp.zeros((num_tasks,)), jnp.zeros((num_tasks,)))),
                    jax.tree.map(jnp.zeros_like, trainable))
            ((loss, (cnt, tl, tc)), grads), _ = jax.lax.scan(
                body, zero, (_microbatches(batch, grad_accum), jnp.arange(grad_accum)))
        denom = jnp.maximum(cnt, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        mean_loss = loss / denom
        gnorm = optax.global_norm(grads)
        ok = jnp.isfinite(mean_loss) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # A non-finite step changes nothing but the counters (the update is skipped, not applied).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_base, new_adapters = lora.split_adapters(keep(new_trainable, trainable))
        new_state = {
            "step": state["step"] + 1,
            "params": merge_params(new_base, frozen),
            "opt_state": keep(new_opt, state["opt_state"]),
            "bad_steps": jnp.where(ok, 0, state["bad_steps"] + 1),
            "skipped": state["skipped"] + jnp.where(ok, 0, 1),
        }
        if "lora" in state:
            new_state["lora"] = traverse_util.unflatten_dict(new_adapters, sep="/")
        metrics = {"loss": mean_loss, "grad_norm": gnorm, "lr": lr_fn(state["step"]), "tokens": cnt,
                   "ok": ok, "task_loss_sum": tl, "task_count": tc}
        return new_state, metrics

    return step


def jit_train_step(step, abstract_state):
    """`jax.jit(step)` with the state donated and returned on the shardings of `abstract_state` (the restore
    target). Left free, XLA may return a param on another sharding than the logical rules' (e.g. the aligner's
    kernel split over "tensor" too): every later step then runs a second program, whose float rounding differs
    from the first one's, which a resumed run (restored onto the rules' shardings) runs; pinned, all steps of
    a run and of its resumption run one program, and a resume is bit-identical."""
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, None))


def make_eval_step(module: DeepseekVL, *, num_tasks: int = 1, loss_chunk: int = 512, text_only: bool = False,
                   lora_spec=None):
    """(params, batch) → loss sums; with `lora_spec`, `params` holds the adapters too (`lora.with_adapters`)."""
    loss_fn = make_loss_fn(module, num_tasks, loss_chunk, text_only, lora_spec)

    def step(params, batch):
        loss, (cnt, tl, tc) = loss_fn(traverse_util.flatten_dict(params, sep="/"), {}, batch)
        return {"loss_sum": loss, "tokens": cnt, "task_loss_sum": tl, "task_count": tc}

    return step
