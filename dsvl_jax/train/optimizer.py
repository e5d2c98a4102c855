"""Learning-rate schedules (cosine and step, with linear warm-up) and the AdamW chain of the paper
(β = 0.9/0.95, grad clip 1.0, weight decay 0), with two levers for training from scratch (the demo):
- weight decay on matrices only (biases, norm scales and other vectors are exempt);
- per-group learning-rate multipliers (`lr_mult`: {"siglip": 2.0, ...} over `stages.GROUPS`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dsvl_jax.train.stages import GROUPS, path_matches


def schedule(kind: str, peak: float, warmup_steps: int, total_steps: int, *, end_factor: float = 0.1,
             milestones=(), factor: float = 0.1):
    """`cosine`: warm-up then cosine to end_factor·peak; `step`: warm-up then ×factor at each milestone
    (fractions of total_steps if < 1); `constant`: warm-up then flat."""
    warm = optax.linear_schedule(0.0, peak, max(warmup_steps, 1)) if warmup_steps else optax.constant_schedule(peak)
    rest = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=end_factor)
    elif kind == "step":
        bounds = {int(m * total_steps if m < 1 else m) - warmup_steps: factor for m in milestones}
        after = optax.piecewise_constant_schedule(peak, {b: f for b, f in bounds.items() if b > 0})
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"lr schedule {kind!r}: expected cosine, step or constant")
    return optax.join_schedules([warm, after], [warmup_steps]) if warmup_steps else after


def _decay_mask(params):
    """Weight decay on matrices and kernels only: the usual exemption of biases and norm scales."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def scale_by_group(multipliers: dict):
    """Multiply the update of each trainable param (a flat {path: array} tree, as the step hands it over)
    by its group's factor; params of no listed group keep 1. Stateless."""
    unknown = set(multipliers) - set(GROUPS)
    if unknown:
        raise ValueError(f"optimizer.lr_mult: unknown group(s) {sorted(unknown)}; groups are {sorted(GROUPS)}")

    def factor(path: str) -> float:
        for group, mult in multipliers.items():
            if path_matches(path, GROUPS[group]):
                return float(mult)
        return 1.0

    def update_fn(updates, state, params=None):
        del params
        return {k: u * factor(k) for k, u in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(opt_cfg, total_steps: int, mask=None):
    """(optax transformation, lr schedule). The transformation sees only the trainable params (the step
    splits them out), so frozen params never get optimizer state."""
    lr = schedule(opt_cfg.schedule, opt_cfg.lr, opt_cfg.warmup_steps, total_steps,
                  end_factor=opt_cfg.get("end_factor", 0.1), milestones=tuple(opt_cfg.get("milestones", ())),
                  factor=opt_cfg.get("step_factor", 0.1))
    train = optax.chain(
        optax.clip_by_global_norm(opt_cfg.clip) if opt_cfg.clip else optax.identity(),
        optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.get("eps", 1e-8),
                    weight_decay=opt_cfg.weight_decay, mu_dtype=jnp.dtype(opt_cfg.get("mu_dtype", "float32")),
                    mask=_decay_mask if opt_cfg.weight_decay else None),
    )
    lr_mult = opt_cfg.get("lr_mult") or {}
    lr_mult = lr_mult.to_dict() if hasattr(lr_mult, "to_dict") else dict(lr_mult)
    if lr_mult:
        train = optax.chain(train, scale_by_group(lr_mult))
    return train, lr
