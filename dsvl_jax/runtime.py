"""`VLM`: the runtime model — config + params (+ mesh) that you call like the HF model and generate with.

    vlm = dsvl_jax.load_pretrained("path/to/deepseek-vl-7b-chat")
    logits = vlm(input_ids, pixel_values=..., high_res_pixel_values=..., attention_mask=...)

Inputs are checked eagerly (numpy) before anything compiles; the forward is jit-compiled once per
input shape. The official contract (`images` in [0,1], `images_seq_mask`, `images_emb_mask`) is
accepted too. `load_pretrained` (`dsvl_jax.convert.load`) returns one; the Flax module it runs is
`dsvl_jax.models.vlm.DeepseekVL`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dsvl_jax.config import VLMConfig
from dsvl_jax.errors import InputError
from dsvl_jax.generation.engine import Generator
from dsvl_jax.generation.inputs import check_ids, check_pixels, check_views
from dsvl_jax.models.quant import check_weights, convert_weights, weights_of
from dsvl_jax.models.vlm import DeepseekVL
from dsvl_jax.state import param_shardings


def _np(x):
    return None if x is None else np.asarray(x)


class VLM:
    def __init__(self, config: VLMConfig, params, mesh=None):
        self.config = config
        self.params = params
        self.mesh = mesh
        self.module = DeepseekVL(config)
        self.source = None  # folder it was loaded from (tokenizer / processor files travel from there)
        self._variants: dict = {}  # weights kind → VLM, for generate(weights=...)

    # ---- weights ----
    @property
    def weights(self) -> str:
        """"fp32", "bf16" or "int8" (weight-only int8 LLM linears, `dsvl_jax.models.quant`)."""
        return weights_of(self.config)

    def with_weights(self, weights: str) -> "VLM":
        """This model with "fp32", "bf16" or "int8" weights (a new VLM; self when it already has them).
        On a mesh the converted params are placed by the logical rules of the new config."""
        check_weights(weights)
        if weights == self.weights:
            return self
        if weights not in self._variants:
            with self.mesh_context():
                cfg, params = convert_weights(self.config, self.params, weights)
            if self.mesh is not None:
                params = jax.device_put(params, param_shardings(cfg, self.mesh)[0])
            other = VLM(cfg, params, mesh=self.mesh)
            other.source = self.source
            self._variants[weights] = other
        return self._variants[weights]

    # ---- checks ----
    def check_ids(self, input_ids, attention_mask=None) -> np.ndarray:
        """input_ids as a [batch, length] integer array of ids in [0, vocab) (at unmasked positions when an
        attention_mask is given), within the context; raises `InputError` naming the argument."""
        c = self.config
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise InputError(f"input_ids must be [batch, length], got shape {ids.shape}")
        if ids.shape[1] > c.text.max_position_embeddings:
            raise InputError(f"input length {ids.shape[1]} exceeds the context of {c.text.max_position_embeddings}")
        mask = None
        if attention_mask is not None:
            mask = np.asarray(attention_mask)
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
            if not np.isin(mask, (0, 1)).all():
                raise InputError("attention_mask must hold only 0 and 1")
            mask = mask == 1
        check_ids(ids, c.text.vocab_size, mask)
        return ids

    def check_inputs(self, input_ids, n_images: int, tokens_per_image: Optional[np.ndarray] = None):
        c = self.config
        ids = self.check_ids(input_ids)
        n_tok = int((ids == c.image_token_id).sum())
        want = int(tokens_per_image) if tokens_per_image is not None else n_images * c.num_image_tokens
        if n_tok != want:
            raise InputError(f"{n_tok} image tokens (id {c.image_token_id}) in input_ids but the images give "
                             f"{want} features ({n_images} images × {c.num_image_tokens} tokens)")

    # ---- forward ----
    @functools.cached_property
    def _forward(self):
        def fwd(params, input_ids, attention_mask, pixel_values, high_res_pixel_values, images, feature_valid,
                image_token_mask):
            return self.module.apply({"params": params}, input_ids, pixel_values=pixel_values,
                                     high_res_pixel_values=high_res_pixel_values, images=images,
                                     image_valid=feature_valid, attention_mask=attention_mask,
                                     image_token_mask=image_token_mask)
        return jax.jit(fwd)

    def __call__(self, input_ids, *, pixel_values=None, high_res_pixel_values=None, attention_mask=None,
                  images=None, images_seq_mask=None, images_emb_mask=None):
        """Logits [B, T, vocab] (float32).

        HF-port contract: `pixel_values` [N,3,s,s] (+ `high_res_pixel_values` [N,3,S,S] for the hybrid),
        normalised, N = all images of the batch in row-major order.
        Official contract: `images` [B, n, 3, S, S] in [0,1] with `images_seq_mask` [B,T] and
        `images_emb_mask` [B, n, tokens]; padded image slots are encoded and dropped."""
        c = self.config
        ids = self.check_ids(input_ids, attention_mask)
        pv, hv, im = _np(pixel_values), _np(high_res_pixel_values), _np(images)
        feature_valid = token_mask = None
        if im is not None:
            if pv is not None or hv is not None:
                raise InputError("pass either `images` (official contract) or pixel_values (HF contract), not both")
            if im.ndim != 5:
                raise InputError(f"images must be [batch, n_images, 3, S, S], got {im.shape}")
            check_pixels("images", im.reshape((-1,) + im.shape[2:]), c.image_size)
            emb = (np.ones(im.shape[:2] + (c.num_image_tokens,), bool) if images_emb_mask is None
                   else np.asarray(images_emb_mask, bool))
            if emb.shape != im.shape[:2] + (c.num_image_tokens,):
                raise InputError(f"images_emb_mask must be {im.shape[:2] + (c.num_image_tokens,)}, got {emb.shape}")
            token_mask = (ids == c.image_token_id) if images_seq_mask is None else np.asarray(images_seq_mask, bool)
            if token_mask.shape != ids.shape:
                raise InputError(f"images_seq_mask must be {ids.shape}, got {token_mask.shape}")
            if int(token_mask.sum()) != int(emb.sum()):
                raise InputError(f"images_seq_mask marks {int(token_mask.sum())} positions but images_emb_mask "
                                 f"{int(emb.sum())} features")
            feature_valid = emb.reshape(-1, c.num_image_tokens)
            im = im.astype(np.float32)
        elif pv is not None:
            check_views(c, pv, hv)
            self.check_inputs(ids, pv.shape[0])
        else:
            self.check_inputs(ids, 0)
        am = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        with self.mesh_context():
            return self._forward(self.params, jnp.asarray(ids, jnp.int32), am,
                             None if pv is None else jnp.asarray(pv, jnp.float32),
                             None if hv is None else jnp.asarray(hv, jnp.float32),
                                 None if im is None else jnp.asarray(im), feature_valid,
                                 None if token_mask is None else jnp.asarray(token_mask))

    def mesh_context(self):
        """Inside it, the logical activation constraints of the model apply to `self.mesh`."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # ---- generation ----
    @functools.cached_property
    def generator(self):
        """The compiled generation programs (`dsvl_jax.generation.engine.Generator`), kept across calls."""
        return Generator(self)

    def generate(self, input_ids, *, pixel_values=None, high_res_pixel_values=None, attention_mask=None,
                 max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, top_k=None, top_p=None,
                 rng=None, eos_token_id=None, pad_token_id=None, weights: Optional[str] = None) -> np.ndarray:
        """New token ids [batch, steps] (prompt excluded), with a KV cache and compiled prefill/decode.

        Inputs as `__call__` (HF-port contract; any padding, rows are re-packed to the left). Greedy by
        default; `do_sample=True` samples with temperature / top-k / top-p from the explicit key `rng`
        (`jax.random.key(seed)`). A row stops at its first `eos_token_id` (an id or a list); later
        positions hold `pad_token_id` (default: the first EOS id, else 0). steps = max_new_tokens, or
        fewer when every row has stopped. `weights` ("fp32" | "bf16" | "int8") runs a converted copy of the
        model (`with_weights`, made once and kept); None runs these params as they are.
        See `dsvl_jax.generation.engine` for timings and streaming."""
        model = self if weights is None else self.with_weights(weights)
        return model.generator.generate(
            input_ids, pixel_values=pixel_values, high_res_pixel_values=high_res_pixel_values,
            attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, rng=rng, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id).tokens
