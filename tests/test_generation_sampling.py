"""Sampling: the candidate sets equal transformers' temperature / top-k / top-p warpers, top-p keeps
what its docstring says, draws are reproducible with one key and differ with another, top-k=1 is
greedy, and the while-loop and step-by-step decoders draw the same tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from dsvl_jax import config as C
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.generation.sampling import candidates, choose_tokens, sampling_config
from tests.helpers import torch_ref as R


@pytest.mark.parametrize("top_k,top_p", [(None, None), (7, None), (None, 0.8), (7, 0.6), (1, None), (None, 0.05)])
def test_candidates_match_transformers_warpers(top_k, top_p):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 50)) * 2).astype(np.float32)
    temperature = 0.7
    scores = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits))
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ref = scores.numpy()
    cfg = sampling_config(True, top_k, top_p, logits.shape[1])
    values, ids = candidates(jnp.asarray(logits), cfg, temperature, 1.0 if top_p is None else top_p)
    ours = np.full_like(logits, -np.inf)
    np.put_along_axis(ours, np.asarray(ids), np.asarray(values), axis=1)
    kept = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(ours), kept)
    assert kept.sum(1).min() >= 1
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=0, atol=1e-6)


def _frequencies(probs, cfg, top_p, n=4000):
    logits = jnp.log(jnp.asarray([probs], jnp.float32))
    keys = jax.random.split(jax.random.key(42), n)
    draws = jax.jit(jax.vmap(lambda k: choose_tokens(logits, k, cfg, 1.0, top_p)[0]))(keys)
    return np.bincount(np.asarray(draws), minlength=len(probs)) / n


def test_top_p_keeps_the_smallest_set_reaching_p():
    """Probabilities .5/.3/.15/.05: top_p .45 → {0}; .7 → {0, 1}; .96 → all four; renormalised."""
    probs = [0.5, 0.3, 0.15, 0.05]
    cfg = sampling_config(True, None, 0.5, len(probs))
    n = 4000
    tol = 4 * np.sqrt(0.25 / n)  # four standard deviations of a frequency
    np.testing.assert_array_equal(_frequencies(probs, cfg, 0.45, n), [1, 0, 0, 0])
    f = _frequencies(probs, cfg, 0.7, n)
    assert f[2:].sum() == 0 and abs(f[0] - 0.5 / 0.8) < tol
    f = _frequencies(probs, cfg, 0.96, n)
    assert (f > 0).all() and np.abs(f - probs).max() < tol
    # top-k then top-p on what top-k left: k=2 renormalises .5/.3, so top_p .7 keeps both.
    f = _frequencies(probs, sampling_config(True, 2, 0.7, len(probs)), 0.7, n)
    assert f[2:].sum() == 0 and abs(f[0] - 0.625) < tol


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = C.tiny()
    path = str(tmp_path_factory.mktemp("tiny_sampling"))
    R.save_hf(R.hf_model(cfg, seed=7, std=0.2), path)
    vlm = load_pretrained(path)
    rows = [R.prompt_ids(cfg, [n], length, seed=r)[0] for r, (n, length) in enumerate([(2, 43), (1, 22)])]
    ids = np.zeros((2, 43), np.int64)
    mask = np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, 43 - len(row):] = row
        mask[r, 43 - len(row):] = 1
    pv, hv = R.image_batch(cfg, 3)
    return vlm, dict(pixel_values=pv, high_res_pixel_values=hv, attention_mask=mask, max_new_tokens=20), ids


def test_same_key_same_tokens_other_key_other_tokens(tiny):
    vlm, kw, ids = tiny
    a = vlm.generate(ids, **kw, do_sample=True, rng=jax.random.key(1))
    b = vlm.generate(ids, **kw, do_sample=True, rng=jax.random.key(1))
    c = vlm.generate(ids, **kw, do_sample=True, rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5
    greedy = vlm.generate(ids, **kw)
    assert (a != greedy).any()


def test_top_k_1_is_greedy(tiny):
    vlm, kw, ids = tiny
    greedy = vlm.generate(ids, **kw)
    sampled = vlm.generate(ids, **kw, do_sample=True, top_k=1, temperature=1.7, rng=jax.random.key(3))
    np.testing.assert_array_equal(sampled, greedy)


def test_while_loop_and_python_steps_draw_the_same_tokens(tiny):
    vlm, kw, ids = tiny
    sampling = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, rng=jax.random.key(5))
    looped = vlm.generator.generate(ids, **kw, **sampling).tokens
    stepped = vlm.generator.generate(ids, loop="python", **kw, **sampling).tokens
    np.testing.assert_array_equal(looped, stepped)
    streamed = np.stack(list(vlm.generator.stream(ids, **kw, **sampling)), axis=1)
    np.testing.assert_array_equal(streamed, looped)
    # A raw uint32 key (jax.random.PRNGKey) and an int seed are accepted and mean the same key.
    raw = vlm.generate(ids, **kw, **{**sampling, "rng": jax.random.PRNGKey(5)})
    seed = vlm.generate(ids, **kw, **{**sampling, "rng": 5})
    np.testing.assert_array_equal(raw, looped)
    np.testing.assert_array_equal(seed, looped)
