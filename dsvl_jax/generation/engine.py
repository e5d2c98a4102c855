"""KV-cache generation: a compiled prefill, then a compiled decode loop (or single steps, for streaming).

Shapes are static: the prompt batch is left-packed at a bucketed length T (`inputs.py`) and the cache
holds S = T + M slots, M = max_new_tokens rounded up to 64. Prefill encodes the images once, writes
the prompt's keys/values into slots [0, T), computes logits for the last position only and picks the
first new token; decode step i (i = 1, 2, ...) feeds token i-1 at slot T + i - 1 with RoPE position
(last prompt position + i), so slot arithmetic is shared by all rows while positions follow each
row's own length (transformers' `generate`: position_ids = cumsum(attention_mask) - 1).

Two ways to run the decode: `jax.lax.while_loop` (one call, exits early once every row has emitted an
EOS) or one compiled step per token called from Python (streaming). Both share the step body and draw
the randomness for token i from `fold_in(rng, i)`, so they produce the same tokens.

Programs are compiled ahead of time (`jit(...).lower(...).compile()`) and cached by input shapes and
static settings, shared by every model with the same config and mesh (the weights are arguments); the
cache keeps the `MAX_PROGRAMS` most recently used programs of the process. `compile_seconds` and
`compile_counts` tell what compiling cost this generator and how often. On a
mesh the params keep their logical shardings, the batch goes over data×fsdp and the cache over
(batch → data×fsdp, kv heads → tensor).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dsvl_jax import sharding
from dsvl_jax.generation.inputs import PackedBatch, bucket_new_tokens, pack_batch
from dsvl_jax.generation.sampling import SamplingConfig, check_sampling, choose_tokens, sampling_config
from dsvl_jax.models.common import constrain
from dsvl_jax.models.llama import cache_mask
from dsvl_jax.state import param_shardings

CACHE_AXES = ("layers", "act_batch", "act_len", "act_kv_heads", None)
EOS_SLOTS = 4  # EOS ids are padded (with -1) to a multiple of this, so their number rarely re-compiles

# (config, mesh, program key) → compiled executable, least recently used first; the programs take the
# params as an argument. A chat session needs a few programs per shape bucket; the bound keeps a
# long-lived process that meets many configs, meshes or buckets from holding every executable forever.
MAX_PROGRAMS = 64
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


@dataclasses.dataclass
class Timings:
    compile_s: float = 0.0  # lowering + XLA compile of programs not seen before (0 when cached)
    prefill_s: float = 0.0  # prefill run (images + prompt + first token), compile excluded
    decode_s: float = 0.0  # all decode steps, compile excluded
    decode_tokens: int = 0  # tokens produced by the decode steps (batch × steps after the first token)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def as_dict(self) -> dict:
        return {"compile_s": self.compile_s, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "decode_tokens": self.decode_tokens, "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclasses.dataclass
class GenerationOutput:
    tokens: np.ndarray  # [B, steps] new tokens; after a row's EOS, the pad id
    timings: Timings
    logits: Optional[np.ndarray] = None  # [B, steps, V] when asked for (loop="python" only)


# ---------------------------------------------------------------------------------------------
# model entry points (flax `method=` functions)
# ---------------------------------------------------------------------------------------------
def _prefill_apply(model, ids, pv, hv, image_valid, positions, mask, cache):
    """Prompt through the model into the cache; logits of the last position only."""
    h, cache = model(ids, pixel_values=pv, high_res_pixel_values=hv, image_valid=image_valid,
                     positions=positions, mask=mask, cache=cache, cache_index=0, return_hidden=True)
    return model.logits_from_hidden(h[:, -1:])[:, 0], cache


def _step_apply(model, tokens, positions, mask, cache, slot):
    logits, cache = model(tokens, positions=positions, mask=mask, cache=cache, cache_index=slot)
    return logits[:, 0], cache


class Generator:
    """Compiled generation for one model (`VLM`): holds the programs, reuses them across calls."""

    def __init__(self, vlm):
        self.vlm = vlm
        self.config = vlm.config
        self.mesh = vlm.mesh
        self.compile_counts = collections.Counter()  # program name → number of compilations
        self.compile_seconds = 0.0
        self._param_shardings = None

    # ---- placement ----
    def _context(self):
        """The mesh as context while tracing, so `constrain` sees the logical sharding rules."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _params(self):
        params = self.vlm.params
        if self.mesh is None:
            return params
        if self._param_shardings is None:
            self._param_shardings = param_shardings(self.config, self.mesh)[0]
        return jax.device_put(params, self._param_shardings)  # no copy when already placed so

    def _put(self, x, names=None):
        """numpy → device array; on a mesh sharded by logical names (replicated when names is None)."""
        if x is None:
            return None
        if self.mesh is None:
            return jnp.asarray(x)
        spec = P() if names is None else sharding.logical_to_spec(names, x.shape, self.mesh)
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    # ---- compiled programs ----
    def _run(self, name: str, fn, statics: dict, donate: Sequence[int], *args):
        leaves, tree = jax.tree.flatten(args)
        key = (self.config, self.mesh, name, tuple(sorted(statics.items())), tree,
               tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves))
        exe = _PROGRAMS.get(key)
        if exe is None:
            t0 = time.perf_counter()
            with self._context():
                exe = jax.jit(functools.partial(fn, **statics), donate_argnums=tuple(donate)).lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
            self.compile_counts[name] += 1
            _PROGRAMS[key] = exe
            while len(_PROGRAMS) > MAX_PROGRAMS:
                _PROGRAMS.popitem(last=False)
        else:
            _PROGRAMS.move_to_end(key)
        return exe(*args)

    def _empty_cache(self, batch: int, slots: int):
        t = self.config.text
        shape = (t.num_hidden_layers, batch, slots, t.num_key_value_heads, t.head_dim)
        dtype = jnp.dtype(self.config.dtype)
        return tuple(constrain(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(2))

    def _prefill(self, params, ids, mask, pv, hv, image_valid, *, new_slots: int):
        """The prompt into a fresh cache; the decode state with the last position's logits, no token yet.
        (Independent of the sampling settings: the costly program compiles once per shape bucket.)"""
        b, t = ids.shape
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        kv_valid = jnp.concatenate([mask.astype(bool), jnp.ones((b, new_slots), bool)], axis=1)
        cache = self._empty_cache(b, t + new_slots)
        logits, cache = self.vlm.module.apply({"params": params}, ids, pv, hv, image_valid, positions,
                                              cache_mask(kv_valid, 0, t), cache, method=_prefill_apply)
        return {"cache": tuple(constrain(c, CACHE_AXES) for c in cache), "kv_valid": kv_valid,
                "last_pos": positions[:, -1], "logits": logits, "token": jnp.zeros((b,), jnp.int32),
                "done": jnp.zeros((b,), bool), "out": jnp.zeros((b, new_slots), jnp.int32),
                "i": jnp.asarray(0, jnp.int32)}

    def _first_token(self, state, controls, *, sampling: SamplingConfig):
        """Token 0 from the prefill logits."""
        token = choose_tokens(state["logits"], jax.random.fold_in(controls["rng"], 0), sampling,
                              controls["temperature"], controls["top_p"])
        out = jnp.full_like(state["out"], controls["pad_id"]).at[:, 0].set(token)
        return dict(state, token=token, done=jnp.isin(token, controls["eos"]), out=out,
                    i=jnp.asarray(1, jnp.int32))

    def _step(self, params, state, controls, *, sampling: SamplingConfig):
        """One decode step: feed the last token, write its keys/values, pick the next token."""
        i = state["i"]
        b, new_slots = state["out"].shape
        slot = state["kv_valid"].shape[1] - new_slots + i - 1
        logits, cache = self.vlm.module.apply(
            {"params": params}, state["token"][:, None], (state["last_pos"] + i)[:, None],
            cache_mask(state["kv_valid"], slot, 1), state["cache"], slot, method=_step_apply)
        token = choose_tokens(logits, jax.random.fold_in(controls["rng"], i), sampling, controls["temperature"],
                              controls["top_p"])
        token = jnp.where(state["done"], controls["pad_id"], token)
        return dict(state, cache=tuple(constrain(c, CACHE_AXES) for c in cache), token=token, logits=logits,
                    done=state["done"] | jnp.isin(token, controls["eos"]), i=i + 1,
                    out=jax.lax.dynamic_update_slice(state["out"], token[:, None], (0, i)))

    def _decode_loop(self, params, state, controls, *, sampling: SamplingConfig):
        def running(s):
            return (s["i"] < controls["max_new"]) & ~jnp.all(s["done"])
        return jax.lax.while_loop(running, lambda s: self._step(params, s, controls, sampling=sampling), state)

    # ---- public ----
    def prepare(self, input_ids, *, pixel_values=None, high_res_pixel_values=None, attention_mask=None,
                max_new_tokens: int, do_sample=False, temperature=1.0, top_k=None, top_p=None, rng=None,
                eos_token_id=None, pad_token_id=None):
        """Check everything (raises `InputError` / `ValueError`) and build the device inputs."""
        batch = pack_batch(self.config, input_ids, attention_mask, pixel_values, high_res_pixel_values,
                           max_new_tokens=max_new_tokens)
        check_sampling(do_sample, temperature, top_k, top_p)
        if do_sample and rng is None:
            raise ValueError("do_sample=True needs an explicit PRNG key: rng=jax.random.key(seed)")
        eos = _id_list(eos_token_id, "eos_token_id", self.config.text.vocab_size)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        _id_list(pad_token_id, "pad_token_id", self.config.text.vocab_size)
        rng = _as_key(rng)
        controls = {"rng": self._put(rng), "temperature": self._put(np.float32(temperature)),
                    "top_p": self._put(np.float32(1.0 if top_p is None else top_p)),
                    "eos": self._put(_padded_ids(eos)), "pad_id": self._put(np.int32(pad_token_id)),
                    "max_new": self._put(np.int32(max_new_tokens))}
        statics = {"sampling": sampling_config(do_sample, top_k, top_p, self.config.text.vocab_size),
                   "new_slots": bucket_new_tokens(max_new_tokens)}
        return batch, controls, statics

    def _prefill_state(self, batch: PackedBatch, controls, statics, timings: Timings):
        """Prefill + first token (timed together as the prefill)."""
        args = (self._params(), self._put(batch.input_ids, ("act_batch", None)),
                self._put(batch.attention_mask, ("act_batch", None)), self._put(batch.pixel_values),
                self._put(batch.high_res_pixel_values), self._put(batch.image_valid))
        c0, t0 = self.compile_seconds, time.perf_counter()
        state = self._run("prefill", self._prefill, {"new_slots": statics["new_slots"]}, (), *args)
        state = self._run("first_token", self._first_token, {"sampling": statics["sampling"]}, (0,), state,
                          controls)
        jax.block_until_ready(state)
        timings.compile_s += self.compile_seconds - c0
        timings.prefill_s += time.perf_counter() - t0 - (self.compile_seconds - c0)
        return state

    def generate(self, input_ids, *, loop: str = "while", keep_logits: bool = False, **kw) -> GenerationOutput:
        """All new tokens at once. loop: "while" (one compiled loop) or "python" (a compiled step per token;
        with keep_logits=True the logits of every step come back too)."""
        if loop not in ("while", "python"):
            raise ValueError(f"loop={loop!r}: expected 'while' or 'python'")
        if keep_logits and loop != "python":
            raise ValueError("keep_logits=True needs loop='python'")
        if loop == "python":
            timings, steps, logits, state = Timings(), 0, [], None
            for _, state in self._iterate(input_ids, kw, timings):
                steps += 1
                if keep_logits:
                    logits.append(sharding.host_array(state["logits"]))
            out = self._output(state, steps, timings)
            out.logits = np.stack(logits, axis=1) if keep_logits else None
            return out
        batch, controls, statics = self.prepare(input_ids, **kw)
        timings = Timings()
        state = self._prefill_state(batch, controls, statics, timings)
        c0, t0 = self.compile_seconds, time.perf_counter()
        state = self._run("decode_loop", self._decode_loop, {"sampling": statics["sampling"]}, (1,),
                          self._params(), state, controls)
        steps = int(state["i"])  # waits for the loop
        timings.compile_s += self.compile_seconds - c0
        timings.decode_s = time.perf_counter() - t0 - (self.compile_seconds - c0)
        timings.decode_tokens = (steps - 1) * batch.input_ids.shape[0]
        return self._output(state, steps, timings)

    def stream(self, input_ids, timings: Optional[Timings] = None, **kw) -> Iterator[np.ndarray]:
        """Yield the new tokens [B] of each step as soon as they exist (pad id for finished rows)."""
        for tokens, _ in self._iterate(input_ids, kw, timings if timings is not None else Timings()):
            yield tokens

    def _iterate(self, input_ids, kw, timings):
        batch, controls, statics = self.prepare(input_ids, **kw)
        state = self._prefill_state(batch, controls, statics, timings)
        max_new = kw["max_new_tokens"]
        params = self._params()
        steps = 1
        yield sharding.host_array(state["token"]), state
        while steps < max_new and not bool(np.all(sharding.host_array(state["done"]))):
            c0, t0 = self.compile_seconds, time.perf_counter()
            state = self._run("decode_step", self._step, {"sampling": statics["sampling"]}, (1,),
                              params, state, controls)
            tokens = sharding.host_array(state["token"])
            timings.compile_s += self.compile_seconds - c0
            timings.decode_s += time.perf_counter() - t0 - (self.compile_seconds - c0)
            timings.decode_tokens += tokens.shape[0]
            steps += 1
            yield tokens, state

    def _output(self, state, steps: int, timings: Timings) -> GenerationOutput:
        return GenerationOutput(sharding.host_array(state["out"])[:, :steps], timings)


def _id_list(x, name: str, vocab: int) -> list:
    if x is None:
        return []
    ids = [x] if isinstance(x, (int, np.integer)) else list(x)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < vocab:
            raise ValueError(f"{name}={x!r}: expected token id(s) in [0, {vocab})")
    return [int(i) for i in ids]


def _padded_ids(ids: list) -> np.ndarray:
    n = max(EOS_SLOTS, -(-len(ids) // EOS_SLOTS) * EOS_SLOTS)
    return np.asarray(ids + [-1] * (n - len(ids)), np.int32)


def _as_key(rng):
    """A typed PRNG key from a key, a raw uint32 key (`jax.random.PRNGKey`), an int seed or None (greedy)."""
    if rng is None:
        return jax.random.key(0)  # unused by greedy decoding
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return jax.random.key(int(rng))
    dtype = getattr(rng, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return rng
    raw = np.asarray(rng)
    if raw.shape != (2,) or not np.issubdtype(raw.dtype, np.unsignedinteger):
        raise ValueError(f"rng: expected jax.random.key(seed), a raw uint32[2] key or an int seed, got {rng!r}")
    return jax.random.wrap_key_data(raw.astype(np.uint32))
