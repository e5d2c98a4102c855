"""Numerical faults for the reliability tests, injected from outside the production step: at given 0-based
steps the loss and every gradient become NaN, the loss alone becomes Inf (gradients finite), or one element
of one gradient leaf becomes Inf (loss finite).

`inject(monkeypatch, nan_steps=..., inf_loss_steps=..., inf_grad_steps=...)` wraps the trainer's
`make_train_step` (the step number rides into the batch as a per-row `fault_step`, so micro-batching splits
it like any key) and `train.step.make_loss_fn` (which reads it)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _inf_in_grad(x, hit):
    return x


def _fwd(x, hit):
    return x, hit


def _bwd(hit, g):
    flat = g.reshape(-1)
    return flat.at[0].set(jnp.where(hit, jnp.inf, flat[0])).reshape(g.shape), None


_inf_in_grad.defvjp(_fwd, _bwd)


def _at(step, steps) -> jax.Array:
    return jnp.isin(step, jnp.asarray(tuple(steps), jnp.int32)) if steps else jnp.asarray(False)


def inject(monkeypatch, *, nan_steps=(), inf_loss_steps=(), inf_grad_steps=()):
    from dsvl_jax.train import step as step_lib
    from dsvl_jax.train import trainer

    real_loss_fn, real_train_step = step_lib.make_loss_fn, trainer.make_train_step

    def make_loss_fn(*args, **kw):
        loss_fn = real_loss_fn(*args, **kw)

        def faulty(trainable, frozen, mb, rng=None):  # the real loss_fn's signature (rng: LoRA dropout)
            step = mb["fault_step"][0]
            loss, aux = loss_fn(trainable, frozen, {k: v for k, v in mb.items() if k != "fault_step"}, rng)
            loss = loss * jnp.where(_at(step, nan_steps), jnp.nan, 1.0)  # NaN times the gradients too
            loss = loss + jax.lax.stop_gradient(jnp.where(_at(step, inf_loss_steps), jnp.inf, 0.0))
            if inf_grad_steps:  # the last leaf as paths sort; a term of value 0 whose gradient carries the Inf
                leaf = sorted(trainable)[-1]  # (through its own path, so it counts even if the step never uses it)
                loss = loss + 0.0 * jnp.sum(_inf_in_grad(trainable[leaf], _at(step, inf_grad_steps)))
            return loss, aux

        return faulty

    def make_train_step(*args, **kw):
        step_fn = real_train_step(*args, **kw)

        def step(state, batch):
            rows = batch["input_ids"].shape[0]
            return step_fn(state, {**batch, "fault_step": jnp.full((rows,), state["step"], jnp.int32)})

        return step

    monkeypatch.setattr(step_lib, "make_loss_fn", make_loss_fn)
    monkeypatch.setattr(trainer, "make_train_step", make_train_step)
