"""DeepSeek-LLM decoder (LLaMA architecture): RMSNorm, rotate-half RoPE, SwiGLU, grouped-query attention.

Layers are stacked on a leading "layers" axis and run with `nn.scan` (one compiled body), with an
optional remat policy. Attention takes a boolean mask [B, T, S] built by the helpers below, so one
code path serves training (causal + padding + packed segments) and KV-cache decoding (slots of a
pre-allocated cache).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsvl_jax.config import TextConfig
from dsvl_jax.models.common import RMSNorm, activation, boxed, constrain, dense, maybe_remat, normal

NEG_INF = -1e30  # finite: a fully masked (padding) query row gives a uniform softmax, not NaN


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
def causal_mask(batch: int, length: int, attention_mask=None, segment_ids=None):
    """[B, T, T] bool: causal, keys must be real tokens, and (if packed) in the query's segment."""
    t = jnp.arange(length)
    mask = jnp.broadcast_to(t[None, :, None] >= t[None, None, :], (batch, length, length))
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def cache_mask(kv_valid, cache_index, length: int):
    """[B, T, S] bool for T new tokens written at slots cache_index.. of an S-slot cache.

    kv_valid [B, S] marks slots holding real tokens (left padding stays False)."""
    s = kv_valid.shape[1]
    q_slot = cache_index + jnp.arange(length)
    mask = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
    return mask[None] & kv_valid.astype(bool)[:, None, :]


# ---------------------------------------------------------------------------------------------
# rotary embedding (HF "rotate half" layout, so q/k weights copy unchanged)
# ---------------------------------------------------------------------------------------------
def rope(x, positions, theta: float):
    """x [B, T, heads, D]; positions [B, T] int."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        c = self.cfg
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = dense((nh, d), ("embed", "heads", "head_dim"), **kw, name="q_proj")(x)
        k = dense((nkv, d), ("embed", "kv_heads", "head_dim"), **kw, name="k_proj")(x)
        v = dense((nkv, d), ("embed", "kv_heads", "head_dim"), **kw, name="v_proj")(x)
        q = constrain(rope(q, positions, c.rope_theta), ("act_batch", "act_len", "act_heads", None))
        k = constrain(rope(k, positions, c.rope_theta), ("act_batch", "act_len", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_len", "act_kv_heads", None))
        new_cache = None
        if cache is not None:
            ck, cv = cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            new_cache = (k, v)
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        b, t = q.shape[:2]
        qg = q.reshape(b, t, nkv, nh // nkv, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
        logits = jnp.where(mask[:, None, None, :, :], logits, NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        o = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, nh, d)
        o = constrain(o, ("act_batch", "act_len", "act_heads", None))
        out = dense(c.hidden_size, ("heads", "head_dim", "embed"), in_axes=(-2, -1), **kw, name="o_proj")(o)
        return out, new_cache


class DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(c.rms_norm_eps, **kw, name="input_layernorm")(x)
        h, new_cache = Attention(c, **kw, name="self_attn")(h, positions, mask, cache, cache_index)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, **kw, name="post_attention_layernorm")(x)
        dkw = dict(use_bias=False, **kw)
        gate = dense(c.intermediate_size, ("embed", "mlp"), **dkw, name="gate_proj")(h)
        up = dense(c.intermediate_size, ("embed", "mlp"), **dkw, name="up_proj")(h)
        h = constrain(activation(c.hidden_act)(gate) * up, ("act_batch", "act_len", "act_mlp"))
        x = x + dense(c.hidden_size, ("mlp", "embed"), **dkw, name="down_proj")(h)
        return constrain(x, ("act_batch", "act_len", "act_embed")), new_cache


class Decoder(nn.Module):
    """The LM. `embed` and `logits` are separate entry points so the VLM can splice image features."""

    cfg: TextConfig
    tie_word_embeddings: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"

    def setup(self):
        c = self.cfg
        self.embed_tokens = self.param("embed_tokens", boxed(normal(), ("vocab", "embed")),
                                       (c.vocab_size, c.hidden_size), self.param_dtype)
        # The cache (or None) is scanned over its leading layer axis; everything else is broadcast.
        self.layers = nn.scan(maybe_remat(DecoderLayer, self.remat_policy), variable_axes={"params": 0},
                              split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                              length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})(
            c, self.dtype, self.param_dtype)
        self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        if not self.tie_word_embeddings:
            self.lm_head = self.param("lm_head", boxed(normal(), ("embed", "vocab")),
                                      (c.hidden_size, c.vocab_size), self.param_dtype)

    def embed(self, input_ids):
        ids = jnp.clip(input_ids, 0, self.cfg.vocab_size - 1)  # the official code maps negatives to 0
        return jnp.take(self.embed_tokens, ids, axis=0).astype(self.dtype)

    def run_layers(self, x, positions, mask, cache=None, cache_index=None):
        """x [B, T, D] → final-normed hidden states, and the updated cache ([L, B, S, kv, d] pairs) or None."""
        x, new_cache = self.layers(x, positions, mask, cache, cache_index)
        return self.norm(x), new_cache

    def logits(self, h):
        w = self.embed_tokens.T if self.tie_word_embeddings else self.lm_head
        out = jnp.einsum("btd,dv->btv", h, w.astype(self.dtype), preferred_element_type=jnp.float32)
        return constrain(out, ("act_batch", "act_len", "act_vocab"))

    def __call__(self, input_ids, positions, mask):
        h, _ = self.run_layers(self.embed(input_ids), positions, mask)
        return self.logits(h)
