"""FLOPs of a training step: the analytic count, chip peaks and MFU, and a jaxpr-level check.

`train_flops_per_step` walks the architecture once with a "has a tangent" flag per activation, the
way JAX's AD decides what the backward computes: every matmul/conv runs forward; its input gradient
(dX) is computed only when something upstream is trainable, its weight gradient (dW) only when its
own weight is. So frozen parts behind nothing trainable (SAM's blocks, SigLIP in stages 1-2) cost a
forward only, while in stage 1 the frozen LLM still pays dX so that the aligner gets its gradient.
Scanned stacks (SigLIP blocks, decoder layers) follow `lax.scan`'s rule: the carry has a tangent in
every layer if any layer makes one, so dX is paid down to layer 0.

A LoRA run (`lora_spec`) adds its adapters' matmuls to each adapted dense layer: forward x·A and (x·A)·B,
2·rows·r·(in + out); backward dB, dh = dδ·Bᵀ and dA always (the adapters are trained: 2·rows·r·(2·out + in)),
and dX through A only when x has a tangent. The adapters make the layer's output (and a scanned stack's carry)
carry a tangent, so the frozen layers after the first adapted one pay their dX. Remat recompute of the adapter
dots is not counted (`recompute` covers the base layers only).

Conventions (all counts are multiply-adds × 2):
- "total" = model FLOPs as our code computes them: decoder attention over the full T×T (the mask
  selects, nothing is skipped), SAM windows over the zero-padded map (64×64 → 70×70 = 25 windows of
  14×14), decomposed rel-pos terms q·R_h, q·R_w, convs counted over their valid taps (zero padding and
  the stride holes of a transposed conv are not multiplies). No recompute: MFU is model FLOPs / peak.
- "total_causal": decoder attention halved (MaxText's convention since its PR #1988).
- "total_packed": decoder attention only inside packed segments of `mean_segment_len` tokens, causal
  halved (pass E[s²]/E[s] for uneven segments); None when not given.
- "total_hardware" = total + "recompute" (remat policy, the chunked loss's `jax.checkpoint` of the
  logits) + "kernel_overhead" (what the SAM global-attention kernels compute beyond the math: the
  blockwise path's 2H-1 table rows and padded query blocks, the Pallas kernel's one-hot bias
  expansion, flash-style backward recompute). HFU would use this figure.

`jaxpr_matmul_flops` counts dot/conv FLOPs in a traced program, multiplying scan bodies by their
length. XLA's `cost_analysis()` counts a while-loop body once (CPU and TPU alike, jax 0.10), so on a
scanned 30-layer model it reports about one layer: compare it with the analytic count only where
every loop runs once (the tests do), and use the jaxpr count for real configs.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Sequence

import flax.linen as nn
import jax
import jax.extend as jex
from flax import traverse_util

from dsvl_jax.config import VLMConfig
from dsvl_jax.ops import relpos_blockwise, relpos_pallas
from dsvl_jax.ops.relpos_attention import resolve_impl
from dsvl_jax.models import lora
from dsvl_jax.models.vlm import DeepseekVL, dummy_inputs
from dsvl_jax.state import abstract_params
from dsvl_jax.train.stages import trainable_mask

PARTS = ("siglip", "sam", "aligner", "llm", "lm_head")

# Dense bf16 peak per JAX device (TFLOP/s). device_kind strings as JAX reports them; first match wins.
PEAK_BF16_TFLOPS = (
    ("v6 lite", 918.0), ("v6e", 918.0),
    ("v5 lite", 197.0), ("v5e", 197.0),
    ("v5p", 459.0), ("tpu v5", 459.0),  # a v5p chip reports device_kind "TPU v5"
    ("v4", 275.0),
    ("h200", 989.0), ("h100", 989.0),
)


def peak_flops_per_device(device_kind: str | None = None, override_tflops: float = 0.0) -> float | None:
    """bf16 dense peak FLOP/s of one device: the override if > 0, else by `device_kind` (default: this
    process's first device); None when unknown (CPU)."""
    if override_tflops and override_tflops > 0:
        return float(override_tflops) * 1e12
    kind = (jax.devices()[0].device_kind if device_kind is None else device_kind).lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in kind:
            return tflops * 1e12
    return None


def mfu(flops_per_step: float, step_seconds: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' summed peak."""
    if not peak or step_seconds <= 0 or n_devices <= 0:
        return None
    return flops_per_step / step_seconds / (n_devices * peak)


def conv_valid_taps(size: int, kernel: int, stride: int, pad: int) -> int:
    """Along one spatial dim: (output position, kernel tap) pairs that read a real input element."""
    out = (size + 2 * pad - kernel) // stride + 1
    return sum(1 for o in range(out) for t in range(kernel) if 0 <= o * stride + t - pad < size)


# ---------------------------------------------------------------------------------------------
# the analytic count
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _trainable_paths(cfg: VLMConfig, patterns: tuple) -> frozenset:
    """Paths of the trained params, from the real (abstract) param tree and the trainer's own mask."""
    arch = cfg.without_remat().replace(dtype="float32", param_dtype="float32")
    params = nn.meta.unbox(abstract_params(arch))
    mask = traverse_util.flatten_dict(trainable_mask(params, patterns), sep="/")
    return frozenset(k for k, m in mask.items() if m)


@functools.lru_cache(maxsize=16)
def _adapted_layers(cfg: VLMConfig, spec: lora.LoraSpec | None) -> dict:
    """{dense-layer path: (in features, out features, rank)} of the layers `spec` adapts ({} without LoRA),
    from the real (abstract) adapter tree: A is [(layers,) in…, r], B [(layers,) r, out…]."""
    if spec is None:
        return {}
    arch = cfg.without_remat().replace(dtype="float32", param_dtype="float32")
    ids, images = dummy_inputs(arch)
    flat = traverse_util.flatten_dict(nn.meta.unbox(lora.abstract_adapters(DeepseekVL(arch), spec, ids, **images)),
                                      sep="/")
    kernels = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(arch)), sep="/")
    out = {}
    for layer in lora.layer_paths(flat):
        a, b = flat[f"{layer}/{lora.A_NAME}"].shape, flat[f"{layer}/{lora.B_NAME}"].shape
        lead = 1 if (len(a) - 1) + (len(b) - 1) > len(kernels[f"{layer}/kernel"]) else 0  # stacked over layers
        out[layer] = (math.prod(a[lead:-1]), math.prod(b[lead + 1:]), a[-1])
    return out


class _Tally:
    """FLOPs per part and phase, with the AD rules for what the backward computes."""

    def __init__(self, trained: frozenset, remat, adapted: dict | None = None):
        self.remat = remat  # remat: tower ('sam', 'siglip', 'llm') -> policy
        self.adapted = adapted or {}  # LoRA: {dense-layer path: (in, out, rank)}
        # an adapter's A and B are trained params under its layer (scan carries and output tangents follow)
        self.trained = trained | {f"{m}/{n}" for m in self.adapted for n in (lora.A_NAME, lora.B_NAME)}
        self.fwd, self.bwd = defaultdict(float), defaultdict(float)
        self.recompute, self.overhead = defaultdict(float), defaultdict(float)
        self.llm_attention = 0.0

    def tr(self, prefix: str | None) -> bool:
        """Is any param under `prefix` trained?"""
        if prefix is None:
            return False
        return any(p == prefix or p.startswith(prefix + "/") for p in self.trained)

    def dense(self, part, flops, x_tan: bool, module: str | None, weight: str | None = None) -> bool:
        """x @ W (a conv likewise): forward; dX if x has a tangent; dW if W is trained. → tangent of the output."""
        weight = weight or (None if module is None else module + "/kernel")
        self.fwd[part] += flops
        self.bwd[part] += flops * (int(x_tan) + int(self.tr(weight)))
        if module in self.adapted:  # LoRA: (x·A)·B beside x·W
            d_in, d_out, r = self.adapted[module]
            rows = round(flops / (2 * d_in * d_out))
            self.fwd[part] += 2 * rows * r * (d_in + d_out)
            self.bwd[part] += 2 * rows * r * (2 * d_out + d_in + (d_in if x_tan else 0))
        return x_tan or self.tr(module) or self.tr(weight)

    def pair(self, part, flops, a_tan: bool, b_tan: bool) -> bool:
        """Product of two activations (attention): a gradient for each operand that has a tangent."""
        self.fwd[part] += flops
        self.bwd[part] += flops * (int(a_tan) + int(b_tan))
        return a_tan or b_tan


def _block_recompute(policy: str, has_bwd: bool, *, batch_dots: float, out_dot: float, proj_trained: bool,
                     all_but_last: float, custom_attention: float = 0.0) -> float:
    """Matmul FLOPs a remat'd block recomputes in the backward (JAX saves per policy, recomputes only the
    residuals the backward needs). `batch_dots`: attention logits dots; `out_dot`: probs @ V, needed again
    only for the out-projection's dW; `all_but_last`: every dot except the last MLP matmul, whose output
    no gradient needs; `custom_attention`: a custom_vjp attention, whose residuals no policy can save."""
    if not has_bwd or policy in ("none", "everything"):
        return 0.0
    if policy == "full":
        return all_but_last + custom_attention
    if policy == "dots_no_batch":
        return batch_dots + (out_dot if proj_trained else 0.0) + custom_attention
    if policy == "dots":
        return custom_attention
    raise ValueError(f"remat_policy={policy!r}: expected none, full, dots, dots_no_batch or everything")


def _global_attention_impl_flops(impl, n, heads, tokens, hd, H, W, f32, has_bwd):
    """(forward, backward) matmul FLOPs a custom-vjp SAM global-attention kernel runs (see dsvl_jax/ops).
    The Pallas figures follow the kernel source (tiles, lane padding, hi/lo bf16 passes); the blockwise
    ones are checked against the traced program by the tests."""
    if impl == "blockwise":
        bq = min(relpos_blockwise.DEFAULT_BLOCK_Q, tokens)
        n_pad = -(-tokens // bq) * bq
        rows = (2 * H - 1) + (2 * W - 1)  # q_blk @ table^T over every table row
        fwd = 2 * n * heads * n_pad * (2 * tokens + rows) * hd
        # backward per block: QK recomputed, dV, dP, dQ, dK; the tables' forward and their two vjps
        bwd = 2 * n * heads * n_pad * (5 * tokens + 3 * rows) * hd
        return fwd, bwd if has_bwd else 0.0
    if impl in ("pallas", "pallas_interpret"):
        bq, bk, n_pad = relpos_pallas.tile_sizes(tokens, relpos_pallas.DEFAULT_BLOCK_Q, relpos_pallas.DEFAULT_BLOCK_K)
        lanes_h, lanes_w = -(-(2 * H - 1) // 128) * 128, -(-(2 * W - 1) // 128) * 128
        lanes_x = 128 if lanes_h == lanes_w == 128 else lanes_h + lanes_w
        passes = 1 if f32 else 2  # bf16 expands the bias rows as hi + lo
        bh, nk = n * heads, n_pad // bk
        rel_rows = 2 * n_pad * hd * (lanes_h + lanes_w)  # q @ Rrev^T, per query tile
        expand = 2 * n_pad * n_pad * lanes_x * passes  # bias rows @ one-hot over each key tile
        d2 = 2 * n_pad * n_pad * hd  # one [n_pad, n_pad] x hd matmul
        fwd = bh * (rel_rows + expand + 2 * d2)
        dkv = rel_rows * nk + expand + 4 * d2
        dq = rel_rows * 3 + expand + 3 * d2 + 2 * n_pad * n_pad * lanes_x
        return fwd, bh * (dkv + dq) if has_bwd else 0.0
    raise ValueError(f"SAM attention impl {impl!r}: expected reference, blockwise, pallas or pallas_interpret")


def _vit_block(T: _Tally, part, prefix, x_tan, *, n_attn, seq, d_model, d_mlp, heads, hd, rows_mlp,
               relpos=None, global_impl=None, f32=False):
    """One pre-norm ViT block (SigLIP, or SAM with `relpos=(H, W)`), n_attn attention instances of
    `seq` tokens each. → tangent of the block output."""
    rows = n_attn * seq
    h = x_tan or T.tr(prefix + "/norm1")
    q, k, v = (T.dense(part, 2 * rows * d_model * heads * hd, h, f"{prefix}/{m}") for m in "qkv")
    qk = 2 * n_attn * heads * seq * seq * hd
    core_before = T.fwd[part] + T.bwd[part]
    logits = T.pair(part, qk, q, k)
    batch_dots, custom = qk, 0.0
    if relpos is not None:
        H, W = relpos
        rh, rw = T.tr(prefix + "/rel_pos_h"), T.tr(prefix + "/rel_pos_w")
        logits = T.pair(part, 2 * n_attn * heads * seq * H * hd, q, rh) | logits
        logits = T.pair(part, 2 * n_attn * heads * seq * W * hd, q, rw) | logits
        batch_dots += 2 * n_attn * heads * seq * (H + W) * hd
    o = T.pair(part, qk, logits, v)
    attn = batch_dots  # the attention dots "full" remat recomputes (probs @ V added below)
    if global_impl is not None:  # a custom_vjp kernel: its own count replaces the math in the hardware total
        fwd, bwd = _global_attention_impl_flops(global_impl, n_attn, heads, seq, hd, H, W, f32, o)
        T.overhead[part] += fwd + bwd - (T.fwd[part] + T.bwd[part] - core_before)
        custom, batch_dots, attn = fwd, 0.0, 0.0
    a = T.dense(part, 2 * rows * heads * hd * d_model, o, prefix + "/proj")
    x1 = x_tan or a
    f1 = T.dense(part, 2 * rows_mlp * d_model * d_mlp, x1 or T.tr(prefix + "/norm2"), prefix + "/fc1")
    f2 = T.dense(part, 2 * rows_mlp * d_mlp * d_model, f1, prefix + "/fc2")
    out = x1 or f2
    all_but_last = 3 * 2 * rows * d_model * heads * hd + attn + (qk if attn else 0.0) \
        + 2 * rows * heads * hd * d_model \
        + 2 * rows_mlp * d_model * d_mlp
    T.recompute[part] += _block_recompute(T.remat(part), out, batch_dots=batch_dots, out_dot=qk if global_impl is None
                                          else 0.0, proj_trained=T.tr(prefix + "/proj/kernel"),
                                          all_but_last=all_but_last, custom_attention=custom)
    return out


def _siglip(T: _Tally, cfg: VLMConfig, n: int) -> bool:
    s, pre = cfg.siglip, "vision/siglip"
    tokens = s.num_patches
    t = T.dense("siglip", 2 * n * tokens * s.hidden_size * s.patch_size ** 2 * s.num_channels, False,
                pre + "/patch_embed")
    t = t or T.tr(pre + "/pos_embed")
    t = t or T.tr(pre + "/blocks")  # scan: the carry has a tangent in every layer if in any
    for _ in range(s.num_hidden_layers):
        t = _vit_block(T, "siglip", pre + "/blocks", t, n_attn=n, seq=tokens, d_model=s.hidden_size,
                       d_mlp=s.intermediate_size, heads=s.num_attention_heads, hd=s.head_dim, rows_mlp=n * tokens)
    return t or T.tr(pre + "/norm")


def _sam(T: _Tally, cfg: VLMConfig, n: int, global_impl: str) -> bool:
    s, pre = cfg.sam, "vision/sam"
    g, c, oc = s.grid, s.hidden_size, s.output_channels
    t = T.dense("sam", 2 * n * g * g * c * s.patch_size ** 2 * s.num_channels, False, pre + "/patch_embed")
    t = t or T.tr(pre + "/pos_embed")
    f32 = cfg.dtype == "float32"
    hd_t = None
    for i in range(s.num_hidden_layers):
        kw = dict(d_model=c, d_mlp=s.mlp_dim, heads=s.num_attention_heads, hd=s.head_dim, rows_mlp=n * g * g)
        if i in s.global_attn_indexes:
            t = _vit_block(T, "sam", f"{pre}/blocks_{i}", t, n_attn=n, seq=g * g, relpos=(g, g),
                           global_impl=None if global_impl == "reference" else global_impl, f32=f32, **kw)
        else:
            ws = s.window_size
            windows = (-(-g // ws)) ** 2  # zero-padded to a multiple of the window
            t = _vit_block(T, "sam", f"{pre}/blocks_{i}", t, n_attn=n * windows, seq=ws * ws, relpos=(ws, ws), **kw)
        if i == s.global_attn_indexes[0]:
            hd_t = t
    o = cfg.hd_output_size
    taps3 = conv_valid_taps(g, 3, 1, 1) ** 2
    r = 4 * o  # bilinear resize to 4 x out_size, as two constant matmuls (jax.image.resize)
    down1, down2 = conv_valid_taps(r, 3, 2, 1) ** 2, conv_valid_taps(2 * o, 3, 2, 1) ** 2

    def neck_down(x, neck):
        x = T.dense("sam", 2 * n * g * g * c * oc, x, f"{pre}/{neck}/conv1") or T.tr(f"{pre}/{neck}/norm1")
        x = T.dense("sam", 2 * n * oc * oc * taps3, x, f"{pre}/{neck}/conv2") or T.tr(f"{pre}/{neck}/norm2")
        x = T.dense("sam", 2 * n * r * g * oc * g, x, None)
        x = T.dense("sam", 2 * n * r * r * oc * g, x, None)
        x = T.dense("sam", 2 * n * 2 * oc * oc * down1, x, pre + "/downsample/conv1")
        return T.dense("sam", 2 * n * 4 * oc * 2 * oc * down2, x, pre + "/downsample/conv2")

    main = neck_down(t, "neck")
    hd = neck_down(hd_t, "neck_hd")
    return main or hd or T.tr(pre + "/hd_alpha")


def _aligner(T: _Tally, cfg: VLMConfig, n: int, low_t: bool, high_t: bool) -> bool:
    d, rows, pre = cfg.text.hidden_size, n * cfg.siglip.num_patches, "aligner"
    low_c = cfg.siglip.hidden_size
    if cfg.adapter == "identity":
        return low_t
    if cfg.adapter == "low_high_hybrid_split_mlp_gelu":
        hi = T.dense("aligner", 2 * rows * 4 * cfg.sam.output_channels * (d // 2), high_t, pre + "/high_up_proj")
        lo = T.dense("aligner", 2 * rows * low_c * (d // 2), low_t, pre + "/low_up_proj")
        x = hi or lo
    else:
        x = T.dense("aligner", 2 * rows * low_c * d, low_t, pre + "/fc_0")
        if cfg.adapter == "linear":
            return x
    for i in range(1, cfg.adapter_depth):
        x = T.dense("aligner", 2 * rows * d * d, x, f"{pre}/fc_{i}")
    return x


def _decoder(T: _Tally, cfg: VLMConfig, b: int, t: int, x_tan: bool) -> bool:
    c, pre = cfg.text, "language_model/layers"
    rows, d, nh, nkv, hd = b * t, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    x = x_tan or T.tr(pre)  # scan carry
    for _ in range(c.num_hidden_layers):
        h = x or T.tr(pre + "/input_layernorm")
        q = T.dense("llm", 2 * rows * d * nh * hd, h, pre + "/self_attn/q_proj")
        k = T.dense("llm", 2 * rows * d * nkv * hd, h, pre + "/self_attn/k_proj")
        v = T.dense("llm", 2 * rows * d * nkv * hd, h, pre + "/self_attn/v_proj")
        qk = 2 * b * nh * t * t * hd
        before = T.fwd["llm"] + T.bwd["llm"]
        o = T.pair("llm", qk, T.pair("llm", qk, q, k), v)
        T.llm_attention += T.fwd["llm"] + T.bwd["llm"] - before
        a = T.dense("llm", 2 * rows * nh * hd * d, o, pre + "/self_attn/o_proj")
        x1 = x or a
        h2 = x1 or T.tr(pre + "/post_attention_layernorm")
        g = T.dense("llm", 2 * rows * d * c.intermediate_size, h2, pre + "/gate_proj")
        u = T.dense("llm", 2 * rows * d * c.intermediate_size, h2, pre + "/up_proj")
        down = T.dense("llm", 2 * rows * c.intermediate_size * d, g or u, pre + "/down_proj")
        out = x1 or down
        proj_qkv = 2 * rows * d * (nh + 2 * nkv) * hd
        T.recompute["llm"] += _block_recompute(
            T.remat("llm"), out, batch_dots=qk, out_dot=qk, proj_trained=T.tr(pre + "/self_attn/o_proj"),
            all_but_last=proj_qkv + 2 * qk + 2 * rows * nh * hd * d + 4 * rows * d * c.intermediate_size)
        x = out
    return x or T.tr("language_model/norm")


def _lm_head(T: _Tally, cfg: VLMConfig, b: int, t: int, h_tan: bool, loss_chunk, num_tasks: int):
    chunk = t if not loss_chunk else min(loss_chunk, t)
    t_pad = -(-t // chunk) * chunk  # the chunked loss pads the sequence to whole chunks
    head = "language_model/embed_tokens" if cfg.tie_word_embeddings else "language_model/lm_head"
    f = 2 * b * t_pad * cfg.text.hidden_size * cfg.text.vocab_size
    logits = T.dense("lm_head", f, h_tan, None, weight=head)
    # per-task sums einsum("bc,bck->k") of the nll and of the mask: metrics (aux), so no backward
    T.fwd["lm_head"] += 2 * 2 * b * t_pad * num_tasks
    if logits:  # chunk_loss is jax.checkpoint'ed: its logits are recomputed in the backward
        T.recompute["lm_head"] += f


def train_flops_per_step(cfg: VLMConfig, *, batch_rows: int, seq_len: int, images_per_step: int,
                         trainable_patterns: Sequence[str], text_only: bool = False,
                         mean_segment_len: float | None = None, loss_chunk: int | None = None,
                         num_tasks: int = 1, sam_impl: str | None = None,
                         lora_spec: lora.LoraSpec | None = None) -> dict:
    """Analytic matmul/conv FLOPs of one `make_train_step` step (all micro-batches; see module doc).

    images_per_step: images the towers encode, i.e. every image slot of the batch ([B, N_slots] → B·N_slots,
    padding slots included: they are encoded, then dropped). loss_chunk: the step's `loss_chunk` (the
    sequence is padded to whole chunks for the logits). sam_impl: the SAM global-attention path that runs
    (default: `cfg.sam_attention_impl` resolved on this process's backend; pass "pallas" when compiling
    for TPU from a CPU host). lora_spec: a LoRA run's adapters (their matmuls are counted; the base
    params trained beside them are `trainable_patterns`). Returns per-part model FLOPs (forward + backward)
    and the totals.
    """
    for name, val, low in (("batch_rows", batch_rows, 1), ("seq_len", seq_len, 1),
                           ("images_per_step", images_per_step, 0), ("num_tasks", num_tasks, 1)):
        if int(val) != val or val < low:
            raise ValueError(f"train_flops_per_step: {name}={val!r} must be an integer >= {low}")
    T = _Tally(_trainable_paths(cfg, tuple(trainable_patterns)), cfg.tower_remat, _adapted_layers(cfg, lora_spec))
    feats_t = False
    if not text_only and images_per_step:
        n = int(images_per_step)
        low = _siglip(T, cfg, n)
        high = False
        if cfg.sam is not None:
            high = _sam(T, cfg, n, resolve_impl(sam_impl or cfg.sam_attention_impl))
        feats_t = _aligner(T, cfg, n, low, high)
    x_t = T.tr("language_model/embed_tokens") or feats_t
    h = _decoder(T, cfg, batch_rows, seq_len, x_t)
    _lm_head(T, cfg, batch_rows, seq_len, h, loss_chunk, num_tasks)

    out = {p: T.fwd[p] + T.bwd[p] for p in PARTS}
    total = sum(out.values())
    out.update(
        total=total,
        forward=sum(T.fwd.values()),
        backward=sum(T.bwd.values()),
        llm_attention=T.llm_attention,
        total_causal=total - T.llm_attention / 2,
        total_packed=None if not mean_segment_len else
        total - T.llm_attention * (1 - min(float(mean_segment_len), seq_len) / seq_len / 2),
        recompute=sum(T.recompute.values()),
        kernel_overhead=sum(T.overhead.values()),
        tokens=batch_rows * seq_len,
    )
    out["total_hardware"] = total + out["recompute"] + out["kernel_overhead"]
    return out


# ---------------------------------------------------------------------------------------------
# the check: matmul FLOPs of a traced program
# ---------------------------------------------------------------------------------------------
def _dot_flops(eqn) -> float:
    lhs = eqn.invars[0].aval.shape
    (lc, _), _ = eqn.params["dimension_numbers"]
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)


def _conv_flops(eqn) -> float:
    """2 × (output element, kernel tap) pairs that read a real input element (not padding, not a hole of
    lhs dilation) × contracted input features."""
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs, rhs, out = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
    pairs = 1
    for i in range(len(dn.lhs_spec) - 2):
        size, k = lhs[dn.lhs_spec[2 + i]], rhs[dn.rhs_spec[2 + i]]
        n_out = out[dn.out_spec[2 + i]]
        s, (lo, _) = p["window_strides"][i], p["padding"][i]
        ld, rd = p["lhs_dilation"][i], p["rhs_dilation"][i]
        extent = (size - 1) * ld + 1
        pairs *= sum(1 for o in range(n_out) for t in range(k)
                     if 0 <= o * s + t * rd - lo < extent and (o * s + t * rd - lo) % ld == 0)
    return 2.0 * out[dn.out_spec[0]] * out[dn.out_spec[1]] * rhs[dn.rhs_spec[1]] * pairs


def jaxpr_matmul_flops(jaxpr) -> float:
    """dot_general + conv FLOPs of a (closed) jaxpr: scan bodies × length, cond = its largest branch,
    Pallas calls by their declared cost estimate, while loops (unknown trip count) once."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_matmul_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(jaxpr_matmul_flops(b) for b in eqn.params["branches"])
        elif name == "pallas_call":
            cost = eqn.params.get("cost_estimate")
            total += float(getattr(cost, "flops", 0) or 0)
        else:
            total += sum(jaxpr_matmul_flops(j) for j in jex.core.jaxprs_in_params(eqn.params))
    return total


def traced_matmul_flops(fn, *args) -> float:
    """`jaxpr_matmul_flops` of fn traced at args (arrays or ShapeDtypeStructs; nothing is computed), after
    dead-code elimination (as XLA would: e.g. the SigLIP MAP head's dummy call, whose result is unused)."""
    closed = jax.make_jaxpr(fn)(*args)
    jaxpr = closed.jaxpr
    try:
        from jax._src.interpreters import partial_eval as pe  # no public DCE entry point in jax 0.10
        jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    except (ImportError, AttributeError):  # a later jax without it: count without DCE
        pass
    return jaxpr_matmul_flops(jaxpr)
