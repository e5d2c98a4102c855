"""Custom ops: SAM attention with decomposed relative positions (reference, blockwise, Pallas)."""
from dsvl_jax.ops.relpos_attention import relpos_attention  # noqa: F401
