"""The packer never reads forever: `max_skips_in_a_row` skipped records without one placed raise
`TooManySkips` with the reasons and the row length the records needed; an `interrupt` callable stops it
mid-skip; a restored packer's state is the state it was restored from."""
import grain
import numpy as np
import pytest

from dsvl_jax.data import packing as P

SPEC = P.RowSpec(seq_len=8, max_images=1, max_examples=2, num_image_tokens=3, image_token_id=99, pad_id=0,
                 image_size=4, long_examples=P.TRUNCATE)


def _example(i: int, length: int, first_supervised: int, image_at=None) -> dict:
    sup = np.zeros(length, bool)
    sup[first_supervised:] = True
    ids = np.arange(1, length + 1, dtype=np.int32)
    starts = np.array([] if image_at is None else [image_at], np.int64)
    if image_at is not None:
        ids[image_at:image_at + SPEC.num_image_tokens] = SPEC.image_token_id
    return {"ids": ids, "supervised": sup, "image_starts": starts, "task_id": 1, "splittable": False, "code": i,
            "source": "src", "record_id": f"r{i}", "pixel_values": np.zeros((len(starts), 3, 4, 4), np.float32)}


def _iter(examples, **kw):
    ds = grain.MapDataset.source(examples).to_iter_dataset()
    return iter(P.PackIterDataset(ds, SPEC, **kw))


def test_a_stream_that_skips_everything_stops_with_what_the_records_need():
    # prompts of 12 and 20 tokens before the first target: rows of 13 and 21 tokens would take them
    exs = [_example(i, 30, 12 if i % 2 else 20) for i in range(10)]
    with pytest.raises(P.TooManySkips) as err:
        next(_iter(exs, max_skips_in_a_row=5))
    e = err.value
    assert e.reasons == {"nothing supervised within seq_len": 5}
    assert e.need_seq_len == (13, 21) and e.need_images == 0
    assert "5 records in a row skipped" in str(e) and "src/r" in e.example


def test_an_image_before_the_first_target_counts_in_what_is_needed():
    exs = [_example(i, 20, 10, image_at=2) for i in range(4)]  # the image run 2..4 does not fit with the prompt
    spec_no_images = P.RowSpec(**{**SPEC.__dict__, "max_images": 0})
    ds = grain.MapDataset.source(exs).to_iter_dataset()
    with pytest.raises(P.TooManySkips) as err:
        next(iter(P.PackIterDataset(ds, spec_no_images, max_skips_in_a_row=4)))
    assert err.value.need_seq_len == (11, 11) and err.value.need_images == 1


def test_skips_between_placed_records_never_reach_the_limit():
    exs = [_example(i, 6 if i % 3 == 0 else 30, 1 if i % 3 == 0 else 20) for i in range(30)]  # 2 skips, 1 placed
    it = _iter(exs * 4, max_skips_in_a_row=3)
    rows = list(it)
    assert rows and it.stats.skipped["nothing supervised within seq_len"] == 80  # far more than 3 in all


def test_no_limit_and_an_interrupt_stop_a_stream_stuck_in_skips():
    calls = []

    def interrupt():
        calls.append(1)
        return len(calls) >= 50

    exs = [_example(i, 30, 20) for i in range(100)]
    with pytest.raises(P.Interrupted):
        next(_iter(exs, max_skips_in_a_row=0, interrupt=interrupt))
    assert len(calls) == 50  # polled at every skip


def test_state_of_a_restored_packer_is_the_state_it_was_restored_from():
    exs = [_example(i, 6, 1) for i in range(9)]
    ds = grain.MapDataset.source(exs).to_iter_dataset()
    it = iter(P.PackIterDataset(ds, SPEC))
    next(it)  # holds back the example that did not fit the first row
    state = it.get_state()
    assert state["holding"]
    again = iter(P.PackIterDataset(ds, SPEC))
    again.set_state(state)
    assert again.get_state() == state  # (read before the held example is read again)
    rest = list(again)
    expected = list(it)
    assert len(rest) == len(expected) and all(np.array_equal(a[k], b[k]) for a, b in zip(rest, expected) for k in a)
