"""DeepSeek-LLM decoder (LLaMA architecture): RMSNorm, rotate-half RoPE, SwiGLU, grouped-query attention.

Layers are stacked on a leading "layers" axis and run with `nn.scan` (one compiled body), with an
optional remat policy. Attention takes a boolean mask [B, T, S] built by the helpers below, so one
code path serves training (causal + padding + packed segments) and KV-cache decoding (slots of a
pre-allocated cache).

KV cache: a pair (k, v) of [layers, B, S, kv_heads, head_dim] arrays. The scan reads it (each layer
its own slice) but does not carry or rebuild it: a layer attends to the cached slots and to its new
keys/values separately (one softmax over both) and returns only the new columns, which are written
into the cache once, after the scan. A decode step therefore moves the cache through memory once
(the attention read), not several times (slice, update, re-stack, copy back).
"""
from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsvl_jax.config import TextConfig
from dsvl_jax.models.common import RMSNorm, activation, boxed, constrain, maybe_remat, normal
from dsvl_jax.models.quant import bf16_matmul, int8_matmul, linear

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
    int8: bool = False  # weight-only int8 linears (`models.quant`)

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None, layer=None):
        """With `cache` (the whole stacked (k, v) pair) and `layer` (this layer's index): attend to the
        cached slots < cache_index and to the new tokens; returns the new (k, v) columns in the cache
        dtype instead of an updated cache."""
        c = self.cfg
        kw = dict(quantized=self.int8, dtype=self.dtype, param_dtype=self.param_dtype)
        nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = linear((nh, d), ("embed", "heads", "head_dim"), **kw, name="q_proj")(x)
        k = linear((nkv, d), ("embed", "kv_heads", "head_dim"), **kw, name="k_proj")(x)
        v = linear((nkv, d), ("embed", "kv_heads", "head_dim"), **kw, name="v_proj")(x)
        q = constrain(rope(q, positions, c.rope_theta), ("act_batch", "act_len", "act_heads", None))
        k = constrain(rope(k, positions, c.rope_theta), ("act_batch", "act_len", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_len", "act_kv_heads", None))
        b, t = q.shape[:2]
        qg = q.reshape(b, t, nkv, nh // nkv, d)
        parts = [(k, v, mask)]  # (keys, values, mask) groups sharing one softmax
        new_kv = None
        if cache is not None:
            new_kv = (k.astype(cache[0].dtype), v.astype(cache[1].dtype))
            k, v = new_kv[0].astype(self.dtype), new_kv[1].astype(self.dtype)  # as if read back from the cache
            parts = [(k, v, jax.lax.dynamic_slice_in_dim(mask, cache_index, t, axis=2))]  # new tokens
            if not (isinstance(cache_index, int) and cache_index == 0):  # slots before cache_index
                old_k, old_v = (jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False).astype(self.dtype)
                                for a in cache)
                parts.insert(0, (old_k, old_v, mask & (jnp.arange(mask.shape[2]) < cache_index)))
        # One einsum per group (no concatenated copy of the cached keys/values), one softmax over all.
        logits = [jnp.where(m[:, None, None],
                            jnp.einsum("btkgd,bskd->bkgts", qg, kk, preferred_element_type=jnp.float32) * (d ** -0.5),
                            NEG_INF) for kk, _, m in parts]
        if len(parts) == 1:
            probs = [jax.nn.softmax(logits[0], axis=-1).astype(self.dtype)]
        else:
            split_at = list(itertools.accumulate(lg.shape[-1] for lg in logits))[:-1]
            probs = jnp.split(jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1).astype(self.dtype), split_at,
                              axis=-1)
        o = jnp.einsum("bkgts,bskd->btkgd", probs[0], parts[0][1])
        for p, (_, vv, _) in zip(probs[1:], parts[1:]):
            o = o + jnp.einsum("bkgts,bskd->btkgd", p, vv)
        o = constrain(o.reshape(b, t, nh, d), ("act_batch", "act_len", "act_heads", None))
        out = linear(c.hidden_size, ("heads", "head_dim", "embed"), in_axes=(-2, -1), **kw, name="o_proj")(o)
        return out, new_kv


class DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    int8: bool = False

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None, layer=None):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(c.rms_norm_eps, **kw, name="input_layernorm")(x)
        h, new_kv = Attention(c, **kw, int8=self.int8, name="self_attn")(h, positions, mask, cache, cache_index, layer)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, **kw, name="post_attention_layernorm")(x)
        dkw = dict(quantized=self.int8, **kw)
        gate = linear(c.intermediate_size, ("embed", "mlp"), **dkw, name="gate_proj")(h)
        up = linear(c.intermediate_size, ("embed", "mlp"), **dkw, name="up_proj")(h)
        h = constrain(activation(c.hidden_act)(gate) * up, ("act_batch", "act_len", "act_mlp"))
        x = x + linear(c.hidden_size, ("mlp", "embed"), **dkw, name="down_proj")(h)
        return constrain(x, ("act_batch", "act_len", "act_embed")), new_kv


class Decoder(nn.Module):
    """The LM. `embed` and `logits` are separate entry points so the VLM can splice image features."""

    cfg: TextConfig
    tie_word_embeddings: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    int8: bool = False  # int8 layer linears and lm_head (`models.quant`)

    def setup(self):
        c = self.cfg
        self.embed_tokens = self.param("embed_tokens", boxed(normal(), ("vocab", "embed")),
                                       (c.vocab_size, c.hidden_size), self.param_dtype)
        # Only the layer index is scanned; the cache (or None) is read by each layer, not carried.
        self.layers = nn.scan(maybe_remat(DecoderLayer, self.remat_policy), variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True},  # a dropout mask per layer (LoRA)
                              in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                              length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})(
            c, self.dtype, self.param_dtype, self.int8)
        self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        if not self.tie_word_embeddings:
            self.lm_head = self.param("lm_head", boxed(nn.initializers.zeros if self.int8 else normal(),
                                                       ("embed", "vocab")),
                                      (c.hidden_size, c.vocab_size), jnp.int8 if self.int8 else self.param_dtype)
            if self.int8:
                self.lm_head_scale = self.param("lm_head_scale", boxed(nn.initializers.ones, ("vocab",)),
                                                (c.vocab_size,), jnp.float32)

    def embed(self, input_ids):
        ids = jnp.clip(input_ids, 0, self.cfg.vocab_size - 1)  # the official code maps negatives to 0
        return jnp.take(self.embed_tokens, ids, axis=0).astype(self.dtype)

    def run_layers(self, x, positions, mask, cache=None, cache_index=None):
        """x [B, T, D] → final-normed hidden states, and the updated cache ([L, B, S, kv, d] pairs) or None.

        With a cache, the T new tokens go to slots cache_index.. and `mask` [B, T, S] covers all S slots."""
        layer_ids = None if cache is None else jnp.arange(self.cfg.num_hidden_layers, dtype=jnp.int32)
        x, new_kv = self.layers(x, positions, mask, cache, cache_index, layer_ids)
        if cache is None:
            return self.norm(x), None
        new_cache = tuple(jax.lax.dynamic_update_slice(c, n, (0, 0, cache_index, 0, 0))
                          for c, n in zip(cache, new_kv))
        return self.norm(x), new_cache

    def logits(self, h):
        if self.int8 and not self.tie_word_embeddings:
            out = int8_matmul(h, self.lm_head, self.lm_head_scale, 1, jnp.float32)
            return constrain(out, ("act_batch", "act_len", "act_vocab"))
        w = self.embed_tokens.T if self.tie_word_embeddings else self.lm_head
        if w.dtype == jnp.bfloat16:  # XLA:CPU's bf16 dot is slow: see `quant.bf16_matmul`
            return constrain(bf16_matmul(h, w, 1, self.dtype), ("act_batch", "act_len", "act_vocab"))
        out = jnp.einsum("btd,dv->btv", h, w.astype(self.dtype), preferred_element_type=jnp.float32)
        return constrain(out, ("act_batch", "act_len", "act_vocab"))

    def __call__(self, input_ids, positions, mask):
        h, _ = self.run_layers(self.embed(input_ids), positions, mask)
        return self.logits(h)
