"""`VLM.generate` on an 8-device CPU mesh (data 2 × fsdp 2 × tensor 2): params sharded by the logical
rules, batch over data×fsdp, KV cache over (batch, kv heads); the same tokens as on one device."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsvl_jax import config as C, sharding
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.generation.engine import Timings
from tests.helpers import torch_ref as R


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = C.tiny()
    path = str(tmp_path_factory.mktemp("tiny_mesh"))
    R.save_hf(R.hf_model(cfg, seed=7, std=0.2), path)
    return cfg, path


def _batch(cfg):
    """Four left-padded rows with 2, 1, 0 and 1 images."""
    rows = [R.prompt_ids(cfg, [n], 16 * n + 4 + 5 * r, seed=r)[0] for r, n in enumerate([2, 1, 0, 1])]
    t = max(map(len, rows))
    ids = np.zeros((4, t), np.int64)
    mask = np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, t - len(row):] = row
        mask[r, t - len(row):] = 1
    pv, hv = R.image_batch(cfg, 4, seed=1)
    return ids, dict(pixel_values=pv, high_res_pixel_values=hv, attention_mask=mask, max_new_tokens=16)


def test_mesh_generation_matches_single_device(checkpoint):
    cfg, path = checkpoint
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    ids, kw = _batch(cfg)
    single = load_pretrained(path)
    sharded = load_pretrained(path, mesh=mesh)
    q = sharded.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)

    greedy = single.generate(ids, **kw)
    assert len(set(greedy.ravel().tolist())) > 10
    np.testing.assert_array_equal(sharded.generate(ids, **kw), greedy)

    sampling = dict(do_sample=True, temperature=0.9, top_p=0.95, rng=jax.random.key(11))
    np.testing.assert_array_equal(sharded.generate(ids, **kw, **sampling), single.generate(ids, **kw, **sampling))

    gen = sharded.generator
    batch, controls, statics = gen.prepare(ids, **kw)
    state = gen._prefill_state(batch, controls, statics, Timings())
    for c in state["cache"]:  # [layers, batch, slots, kv heads, head dim]
        assert c.sharding.spec == P(None, ("data", "fsdp"), None, "tensor")
    assert state["out"].sharding.spec == P(("data", "fsdp"))
