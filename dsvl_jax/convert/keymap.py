"""The checkpoint key map: one declarative table from our parameter paths to both PyTorch layouts.

Each `Row` names our parameter(s), the PyTorch key(s) in the HF-transformers port layout and in the
official deepseek-ai layout, and the transform kind. Loading runs it forwards, export backwards.

- `{i}` in a PyTorch key enumerates layers. If our path has no `{i}`, our parameter is *stacked*
  (leading layer axis, `nn.scan`); if it has one too, our parameters are per block (SAM).
- Several of our params against one PyTorch key = a fused tensor split along its output rows
  (SAM `qkv`, official SigLIP `qkv`, HF MAP-head `in_proj`); against as many keys = one-to-one.
- Kinds: `linear` (torch [out, in] ↔ our kernel [in dims…, out dims…]; `in_ndim` says how many
  leading dims of ours are input), `bias`, `conv` (OIHW ↔ HWIO), `copy` (same data; the PyTorch
  shape may add leading 1s, e.g. the official SigLIP pos_embed (1, N, C) against our (N, C)).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional, Sequence

import numpy as np

from dsvl_jax.config import VLMConfig

LAYOUTS = ("hf", "official")


@dataclasses.dataclass(frozen=True)
class Row:
    ours: tuple
    kind: str
    hf: Optional[tuple] = None
    official: Optional[tuple] = None
    in_ndim: int = 1
    layers: int = 0
    # PyTorch shape = (1,)*lead_ones[layout] + our shape, for `copy` rows whose layouts add leading 1s.
    lead_ones: tuple = (("hf", 0), ("official", 0))

    def keys(self, layout):
        return self.hf if layout == "hf" else self.official

    def ones(self, layout):
        return dict(self.lead_ones)[layout]


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One concrete PyTorch tensor ↔ one or more of our params (optionally at a layer index)."""

    torch_key: str
    ours: tuple  # our param paths ("a/b/c")
    kind: str
    in_ndim: int
    layer: Optional[int]  # index on our leading (stacked) axis, None if not stacked
    lead_ones: int


def _r(ours, kind, hf=None, official=None, **kw):
    tup = lambda x: None if x is None else ((x,) if isinstance(x, str) else tuple(x))
    return Row(ours=tup(ours), kind=kind, hf=tup(hf), official=tup(official), **kw)


def _linear(ours, hf, official, *, bias=True, in_ndim=1, layers=0):
    """kernel (+ bias) rows for a Linear whose torch names are `<prefix>.weight/.bias`."""
    ours = (ours,) if isinstance(ours, str) else tuple(ours)
    hf = None if hf is None else ((hf,) if isinstance(hf, str) else tuple(hf))
    official = None if official is None else ((official,) if isinstance(official, str) else tuple(official))
    suffix = lambda keys, s: None if keys is None else tuple(f"{k}.{s}" for k in keys)
    rows = [Row(tuple(f"{o}/kernel" for o in ours), "linear", suffix(hf, "weight"), suffix(official, "weight"),
                in_ndim=in_ndim, layers=layers)]
    if bias:
        rows.append(Row(tuple(f"{o}/bias" for o in ours), "bias", suffix(hf, "bias"), suffix(official, "bias"),
                        layers=layers))
    return rows


def _norm(ours, hf, official, *, layers=0, bias=True, rms=False):
    s = "scale"
    rows = [_r(f"{ours}/{s}", "copy", None if hf is None else f"{hf}.weight",
               None if official is None else f"{official}.weight", layers=layers)]
    if bias and not rms:
        rows.append(_r(f"{ours}/bias", "copy", None if hf is None else f"{hf}.bias",
                       None if official is None else f"{official}.bias", layers=layers))
    return rows


def _siglip_rows(cfg: VLMConfig):
    c = cfg.siglip
    hf = "model.vision_model"
    off = "vision_model.vision_tower_low.vision_tower" if cfg.is_hybrid else "vision_model.vision_tower"
    o = "vision/siglip"
    L = c.num_hidden_layers
    hb, ob = f"{hf}.encoder.layers.{{i}}", f"{off}.blocks.{{i}}"
    rows = [
        _r(f"{o}/patch_embed/kernel", "conv", f"{hf}.embeddings.patch_embedding.weight", f"{off}.patch_embed.proj.weight"),
        _r(f"{o}/patch_embed/bias", "copy", f"{hf}.embeddings.patch_embedding.bias", f"{off}.patch_embed.proj.bias"),
        _r(f"{o}/pos_embed", "copy", f"{hf}.embeddings.position_embedding.weight", f"{off}.pos_embed",
           lead_ones=(("hf", 0), ("official", 1))),
        *_norm(f"{o}/blocks/norm1", f"{hb}.layer_norm1", f"{ob}.norm1", layers=L),
        *_linear([f"{o}/blocks/q", f"{o}/blocks/k", f"{o}/blocks/v"],
                 [f"{hb}.self_attn.q_proj", f"{hb}.self_attn.k_proj", f"{hb}.self_attn.v_proj"],
                 f"{ob}.attn.qkv", layers=L),
        *_linear(f"{o}/blocks/proj", f"{hb}.self_attn.out_proj", f"{ob}.attn.proj", in_ndim=2, layers=L),
        *_norm(f"{o}/blocks/norm2", f"{hb}.layer_norm2", f"{ob}.norm2", layers=L),
        *_linear(f"{o}/blocks/fc1", f"{hb}.mlp.fc1", f"{ob}.mlp.fc1", layers=L),
        *_linear(f"{o}/blocks/fc2", f"{hb}.mlp.fc2", f"{ob}.mlp.fc2", layers=L),
        *_norm(f"{o}/norm", f"{hf}.post_layernorm", f"{off}.norm"),
    ]
    if c.use_head:
        h, oh, ah = f"{o}/head", f"{hf}.head", f"{off}.attn_pool"
        rows += [
            _r(f"{h}/latent", "copy", f"{oh}.probe", f"{ah}.latent"),
            # HF fuses q and kv into nn.MultiheadAttention's in_proj; the official head keeps them apart.
            _r((f"{h}/q/kernel", f"{h}/kv/kernel"), "linear", f"{oh}.attention.in_proj_weight",
               (f"{ah}.q.weight", f"{ah}.kv.weight")),
            _r((f"{h}/q/bias", f"{h}/kv/bias"), "bias", f"{oh}.attention.in_proj_bias",
               (f"{ah}.q.bias", f"{ah}.kv.bias")),
            *_linear(f"{h}/proj", f"{oh}.attention.out_proj", f"{ah}.proj"),
            *_norm(f"{h}/norm", f"{oh}.layernorm", f"{ah}.norm"),
            *_linear(f"{h}/fc1", f"{oh}.mlp.fc1", f"{ah}.mlp.fc1"),
            *_linear(f"{h}/fc2", f"{oh}.mlp.fc2", f"{ah}.mlp.fc2"),
        ]
    return rows


def _neck_rows(ours, hf, off):
    return [
        _r(f"{ours}/conv1/kernel", "conv", f"{hf}.conv1.weight", f"{off}.0.weight"),
        *_norm(f"{ours}/norm1", f"{hf}.layer_norm1", f"{off}.1"),
        _r(f"{ours}/conv2/kernel", "conv", f"{hf}.conv2.weight", f"{off}.2.weight"),
        *_norm(f"{ours}/norm2", f"{hf}.layer_norm2", f"{off}.3"),
    ]


def _sam_rows(cfg: VLMConfig):
    c = cfg.sam
    hf, off, o = "model.high_res_vision_model.vision_encoder", "vision_model.vision_tower_high.vision_tower", "vision/sam"
    L = c.num_hidden_layers
    rows = [
        _r(f"{o}/patch_embed/kernel", "conv", f"{hf}.patch_embed.projection.weight", f"{off}.patch_embed.proj.weight"),
        _r(f"{o}/patch_embed/bias", "copy", f"{hf}.patch_embed.projection.bias", f"{off}.patch_embed.proj.bias"),
        _r(f"{o}/pos_embed", "copy", f"{hf}.pos_embed", f"{off}.pos_embed"),
    ]
    ob, hb, tb = f"{o}/blocks_{{i}}", f"{hf}.layers.{{i}}", f"{off}.blocks.{{i}}"
    rows += [
        *_norm(f"{ob}/norm1", f"{hb}.layer_norm1", f"{tb}.norm1", layers=L),
        _r(f"{ob}/rel_pos_h", "copy", f"{hb}.attn.rel_pos_h", f"{tb}.attn.rel_pos_h", layers=L),
        _r(f"{ob}/rel_pos_w", "copy", f"{hb}.attn.rel_pos_w", f"{tb}.attn.rel_pos_w", layers=L),
        *_linear([f"{ob}/q", f"{ob}/k", f"{ob}/v"], f"{hb}.attn.qkv", f"{tb}.attn.qkv", bias=c.qkv_bias, layers=L),
        *_linear(f"{ob}/proj", f"{hb}.attn.proj", f"{tb}.attn.proj", in_ndim=2, layers=L),
        *_norm(f"{ob}/norm2", f"{hb}.layer_norm2", f"{tb}.norm2", layers=L),
        *_linear(f"{ob}/fc1", f"{hb}.mlp.lin1", f"{tb}.mlp.lin1", layers=L),
        *_linear(f"{ob}/fc2", f"{hb}.mlp.lin2", f"{tb}.mlp.lin2", layers=L),
        *_neck_rows(f"{o}/neck", f"{hf}.neck", f"{off}.neck"),
        *_neck_rows(f"{o}/neck_hd", "model.high_res_vision_neck", f"{off}.neck_hd"),
        _r(f"{o}/downsample/conv1/kernel", "conv", "model.high_res_vision_proj.conv1.weight", f"{off}.downsamples.0.weight"),
        _r(f"{o}/downsample/conv2/kernel", "conv", "model.high_res_vision_proj.conv2.weight", f"{off}.downsamples.1.weight"),
        _r(f"{o}/hd_alpha", "copy", "model.high_res_vision_alpha", f"{off}.hd_alpha_downsamples"),
    ]
    if cfg.unused_hybrid_norms:  # official only: the HF port dropped these never-used LayerNorms
        rows += [*_norm("vision/high_layer_norm", None, "vision_model.high_layer_norm"),
                 *_norm("vision/low_layer_norm", None, "vision_model.low_layer_norm")]
    return rows


def _aligner_rows(cfg: VLMConfig):
    a, depth = cfg.adapter, cfg.adapter_depth
    if a == "identity":
        return []
    if a == "linear":
        return _linear("aligner/fc_0", None, "aligner.layers")
    if a == "mlp_gelu":
        hf = {0: "model.aligner.linear1", 1: "model.aligner.linear2"}
        return [r for i in range(depth) for r in _linear(f"aligner/fc_{i}", hf.get(i) if depth == 2 else None,
                                                          f"aligner.layers.{2 * i}")]
    rows = [*_linear("aligner/high_up_proj", "model.aligner.high_res_vision_proj", "aligner.high_up_proj"),
            *_linear("aligner/low_up_proj", "model.aligner.vision_proj", "aligner.low_up_proj")]
    for i in range(1, depth):
        rows += _linear(f"aligner/fc_{i}", "model.aligner.proj" if depth == 2 else None, f"aligner.layers.{2 * i - 1}")
    return rows


def _lm_rows(cfg: VLMConfig):
    t = cfg.text
    L = t.num_hidden_layers
    hf, off, o = "model.language_model", "language_model.model", "language_model"
    hb, ob, lb = f"{hf}.layers.{{i}}", f"{off}.layers.{{i}}", f"{o}/layers"
    rows = [
        _r(f"{o}/embed_tokens", "copy", f"{hf}.embed_tokens.weight", f"{off}.embed_tokens.weight"),
        *_norm(f"{lb}/input_layernorm", f"{hb}.input_layernorm", f"{ob}.input_layernorm", layers=L, rms=True),
        *[r for n in ("q", "k", "v") for r in _linear(f"{lb}/self_attn/{n}_proj", f"{hb}.self_attn.{n}_proj",
                                                       f"{ob}.self_attn.{n}_proj", bias=False, layers=L)],
        *_linear(f"{lb}/self_attn/o_proj", f"{hb}.self_attn.o_proj", f"{ob}.self_attn.o_proj", bias=False,
                 in_ndim=2, layers=L),
        *_norm(f"{lb}/post_attention_layernorm", f"{hb}.post_attention_layernorm", f"{ob}.post_attention_layernorm",
               layers=L, rms=True),
        *[r for n in ("gate", "up", "down") for r in _linear(f"{lb}/{n}_proj", f"{hb}.mlp.{n}_proj",
                                                              f"{ob}.mlp.{n}_proj", bias=False, layers=L)],
        *_norm(f"{o}/norm", f"{hf}.norm", f"{off}.norm", rms=True),
    ]
    if not cfg.tie_word_embeddings:
        rows.append(_r(f"{o}/lm_head", "linear", "lm_head.weight", "language_model.lm_head.weight"))
    return rows


def rows_for(cfg: VLMConfig) -> list:
    rows = _siglip_rows(cfg)
    if cfg.is_hybrid:
        rows += _sam_rows(cfg)
    return rows + _aligner_rows(cfg) + _lm_rows(cfg)


def mappings(cfg: VLMConfig, layout: str) -> Iterator[Mapping]:
    """Concrete (torch key ↔ our params) pairs for one layout. Raises if the layout cannot hold the model."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    for row in rows_for(cfg):
        keys = row.keys(layout)
        if keys is None:
            if layout == "hf" and row.ours[0].startswith(("vision/high_layer_norm", "vision/low_layer_norm")):
                continue  # never-used official extras: not part of the HF port
            raise ValueError(f"the {layout} layout has no place for parameter {row.ours[0]!r} "
                             f"(adapter={cfg.adapter!r}, depth={cfg.adapter_depth})")
        n = row.layers or 1
        for i in range(n) if row.layers else [None]:
            ours = tuple(p.replace("{i}", str(i)) for p in row.ours) if i is not None else row.ours
            stacked_idx = i if (i is not None and "{i}" not in row.ours[0]) else None
            tk = tuple(k.replace("{i}", str(i)) for k in keys) if i is not None else keys
            if len(tk) == len(ours):
                for k, p in zip(tk, ours):
                    yield Mapping(k, (p,), row.kind, row.in_ndim, stacked_idx, row.ones(layout))
            elif len(tk) == 1:
                yield Mapping(tk[0], ours, row.kind, row.in_ndim, stacked_idx, row.ones(layout))
            else:
                raise AssertionError(f"row {row} pairs {len(tk)} keys with {len(ours)} params")


def export_config(cfg: VLMConfig, layout: str) -> VLMConfig:
    """The config whose rows an export to `layout` writes. The official `HybridVisionTower` builds its two
    never-used LayerNorms unconditionally, so an official-layout hybrid always carries them."""
    if layout == "official" and cfg.is_hybrid and not cfg.unused_hybrid_norms:
        return cfg.replace(unused_hybrid_norms=True)
    return cfg


def initial_values(cfg: VLMConfig) -> dict:
    """{our path: (shape, value)} for exported tensors a model may lack: the unused hybrid LayerNorms at
    torch.nn.LayerNorm's initial values (a model loaded from the HF port has none to give)."""
    if not cfg.is_hybrid:
        return {}
    out = {}
    for name, width in (("high", 4 * cfg.sam.output_channels), ("low", cfg.siglip.hidden_size)):
        out[f"vision/{name}_layer_norm/scale"] = ((width,), 1.0)
        out[f"vision/{name}_layer_norm/bias"] = ((width,), 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# transforms (numpy): torch tensor ↔ our arrays
# ---------------------------------------------------------------------------------------------
def torch_shape(kind: str, our_shapes: Sequence[tuple], in_ndim: int, lead_ones: int = 0) -> tuple:
    """The PyTorch shape a mapping expects, from our (per-layer) shapes."""
    if kind == "linear":
        ins = {math.prod(s[:in_ndim]) for s in our_shapes}
        if len(ins) != 1:
            raise AssertionError(f"fused parts disagree on the input size: {our_shapes}")
        return (sum(math.prod(s[in_ndim:]) for s in our_shapes), ins.pop())
    if kind == "bias":
        return (sum(math.prod(s) for s in our_shapes),)
    if kind == "conv":
        (h, w, i, o), = our_shapes
        return (o, i, h, w)
    return (1,) * lead_ones + tuple(our_shapes[0])


def to_ours(kind: str, t: np.ndarray, our_shapes: Sequence[tuple], in_ndim: int) -> list:
    """One PyTorch tensor → our arrays (one per fused part)."""
    if kind == "linear":
        sizes = [math.prod(s[in_ndim:]) for s in our_shapes]
        parts = np.split(t, np.cumsum(sizes)[:-1], axis=0)
        return [p.T.reshape(s) for p, s in zip(parts, our_shapes)]
    if kind == "bias":
        sizes = [math.prod(s) for s in our_shapes]
        return [p.reshape(s) for p, s in zip(np.split(t, np.cumsum(sizes)[:-1]), our_shapes)]
    if kind == "conv":
        return [np.ascontiguousarray(t.transpose(2, 3, 1, 0))]
    return [t.reshape(our_shapes[0])]


def to_torch(kind: str, arrays: Sequence[np.ndarray], in_ndim: int, lead_ones: int = 0) -> np.ndarray:
    """Our arrays (one per fused part) → one PyTorch tensor. Inverse of `to_ours`."""
    if kind == "linear":
        mats = [a.reshape(math.prod(a.shape[:in_ndim]), -1).T for a in arrays]
        return np.ascontiguousarray(np.concatenate(mats, axis=0))
    if kind == "bias":
        return np.concatenate([a.reshape(-1) for a in arrays])
    if kind == "conv":
        return np.ascontiguousarray(arrays[0].transpose(3, 2, 0, 1))
    return arrays[0].reshape((1,) * lead_ones + arrays[0].shape)
