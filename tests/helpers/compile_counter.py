"""Counting XLA compilations through JAX's own monitoring events."""
from __future__ import annotations

import jax


class CompileCounter:
    """Counts XLA backend compilations while active (`with CompileCounter() as c: ...; c.count`)."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)
