"""DeepSeek-VL: vision towers → aligner → image features written into the image-token positions → LM.

Image placement follows HF's `masked_scatter` (and the official `images_seq_mask` scatter): the k-th
image token of the batch, in row-major order, receives the k-th valid image-feature row, images
taken in order and invalid (padding) image slots skipped. Shapes stay static under jit; the count
check happens eagerly in `dsvl_jax.runtime.VLM` / the data pipeline, where the arrays are concrete.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsvl_jax.config import VLMConfig
from dsvl_jax.models.aligner import Aligner
from dsvl_jax.models.common import constrain, dtype_of
from dsvl_jax.models.llama import Decoder, causal_mask
from dsvl_jax.models.vision import VisionTowers, views_from_unit_images


def merge_tokens_2x2(x, grid: int):
    """[N, g², D] → [N, (g/2)², D]: average of each 2×2 patch of visual tokens (visual-token compression)."""
    n, _, d = x.shape
    x = x.reshape(n, grid // 2, 2, grid // 2, 2, d).mean(axis=(2, 4))
    return x.reshape(n, (grid // 2) ** 2, d)


def scatter_image_features(embeds, input_ids, features, image_token_id, image_valid=None, image_token_mask=None):
    """Write features [N, T_img, D] into the image-token positions of embeds [B, T, D].

    image_valid: [N] (per image) or [N, T_img] (per feature row) marks the features to use;
    image_token_mask [B, T] overrides `input_ids == image_token_id` (official `images_seq_mask`)."""
    b, t, d = embeds.shape
    n, t_img, _ = features.shape
    flat = features.reshape(n * t_img, d).astype(embeds.dtype)
    is_img = (input_ids == image_token_id) if image_token_mask is None else image_token_mask.astype(bool)
    is_img = is_img.reshape(-1)
    k = jnp.cumsum(is_img) - 1  # k-th image token of the batch
    if image_valid is not None:
        valid = image_valid.astype(bool).reshape(n, -1)
        row_valid = jnp.broadcast_to(valid, (n, t_img)).reshape(-1)
        src_rows = jnp.nonzero(row_valid, size=n * t_img, fill_value=0)[0]
        k = src_rows[jnp.clip(k, 0, n * t_img - 1)]
    picked = flat[jnp.clip(k, 0, n * t_img - 1)]
    out = jnp.where(is_img[:, None], picked, embeds.reshape(b * t, d))
    return out.reshape(b, t, d)


def scatter_image_features_per_row(embeds, input_ids, features, image_token_id, image_valid):
    """Per-row placement for batches laid out [B, N_slots, ...] (the training pipeline): row b's k-th
    image token takes row b's k-th valid feature row. No cross-row (cross-device) indexing."""
    b, t, d = embeds.shape
    _, m, _ = features.shape  # [B, N_slots * T_img, D]
    is_img = input_ids == image_token_id
    k = jnp.cumsum(is_img, axis=1) - 1  # [B, T]
    valid = jnp.broadcast_to(image_valid.astype(bool).reshape(b, -1, 1),
                             (b, image_valid.shape[1], m // image_valid.shape[1])).reshape(b, m)
    src = jax.vmap(lambda v: jnp.nonzero(v, size=m, fill_value=0)[0])(valid)  # [B, M]
    idx = jnp.take_along_axis(src, jnp.clip(k, 0, m - 1), axis=1)  # [B, T]
    picked = jnp.take_along_axis(features.astype(embeds.dtype), idx[..., None], axis=1)
    return jnp.where(is_img[..., None], picked, embeds)


class DeepseekVL(nn.Module):
    cfg: VLMConfig

    def setup(self):
        c = self.cfg
        kw = dict(dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype))
        self.vision = VisionTowers(c, **kw)
        self.aligner = Aligner(c, **kw)
        self.language_model = Decoder(c.text, c.tie_word_embeddings, remat_policy=c.tower_remat("llm"),
                                      int8=c.quantization == "int8", **kw)

    def encode_images(self, pixel_values=None, high_res_pixel_values=None, images=None):
        """→ [N, num_image_tokens, D]. Accepts [N,3,S,S] or [B,N,3,S,S] (flattened row-major)."""
        c = self.cfg
        if images is not None:
            images = images.reshape((-1,) + images.shape[-3:])
            pixel_values, high_res_pixel_values = views_from_unit_images(images, c)
        pixel_values = pixel_values.reshape((-1,) + pixel_values.shape[-3:])
        if high_res_pixel_values is not None:
            high_res_pixel_values = high_res_pixel_values.reshape((-1,) + high_res_pixel_values.shape[-3:])
        low, high = self.vision(pixel_values, high_res_pixel_values)
        feats = self.aligner(low, high)
        if c.token_merge == 2:
            feats = merge_tokens_2x2(feats, c.siglip.grid)
        return feats

    def embed(self, input_ids, image_features=None, image_valid=None, image_token_mask=None):
        x = self.language_model.embed(input_ids)
        if image_features is not None:
            x = scatter_image_features(x, input_ids, image_features, self.cfg.image_token_id, image_valid,
                                       image_token_mask)
        return constrain(x, ("act_batch", "act_len", "act_embed"))

    def __call__(self, input_ids, *, pixel_values=None, high_res_pixel_values=None, images=None,
                 image_valid=None, attention_mask=None, positions=None, segment_ids=None, mask=None,
                 image_token_mask=None, cache=None, cache_index=None, return_hidden=False):
        """Logits [B, T, V] (float32); with `cache`, also the updated cache.

        Images: HF-port (`pixel_values` [+ `high_res_pixel_values`]) or official (`images` in [0,1]);
        `image_valid` [N] or [B, N] marks real image slots (padding slots are encoded, then dropped).
        No images → the towers are not run (text-only batch).
        """
        b, t = input_ids.shape
        feats = None
        if pixel_values is not None or images is not None:
            feats = self.encode_images(pixel_values, high_res_pixel_values, images)
        first = images if images is not None else pixel_values
        if feats is not None and first.ndim == 5 and image_valid is not None and image_token_mask is None:
            # [B, N, 3, S, S] slots per row: place per row (keeps a data-sharded batch local).
            x = self.language_model.embed(input_ids)
            x = scatter_image_features_per_row(x, input_ids, feats.reshape(b, -1, feats.shape[-1]),
                                               self.cfg.image_token_id, image_valid)
            x = constrain(x, ("act_batch", "act_len", "act_embed"))
        else:
            x = self.embed(input_ids, feats, image_valid, image_token_mask)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if mask is None:
            mask = causal_mask(b, t, attention_mask, segment_ids)
        h, new_cache = self.language_model.run_layers(x, positions, mask, cache, cache_index)
        if return_hidden:
            return h, new_cache
        logits = self.language_model.logits(h)
        return (logits, new_cache) if cache is not None else logits

    def logits_from_hidden(self, h):
        return self.language_model.logits(h)


def dummy_inputs(cfg: VLMConfig, batch: int = 1):
    """Smallest inputs that touch every parameter (one image per row): for init and eval_shape."""
    t = cfg.num_image_tokens + 2
    ids = jnp.zeros((batch, t), jnp.int32).at[:, 1:1 + cfg.num_image_tokens].set(cfg.image_token_id)
    s = cfg.siglip.image_size
    pv = jnp.zeros((batch, 3, s, s), jnp.float32)
    hv = None if cfg.sam is None else jnp.zeros((batch, 3, cfg.sam.image_size, cfg.sam.image_size), jnp.float32)
    return ids, dict(pixel_values=pv, high_res_pixel_values=hv)

