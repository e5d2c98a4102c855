"""MetricWriter: a run starting at step N drops the rows an earlier run logged after N (so a resumed run logs
no step twice, and a line cut short by a kill goes too); TensorBoard gets legal tag names (no "illegal summary
name" log line for skip reasons with spaces), metrics.jsonl keeps the names as they are."""
import glob
import json
import logging
import struct

from dsvl_jax.train.metrics import MetricWriter, tag


def _rows(wd):
    return [json.loads(line) for line in open(wd / "metrics.jsonl")]


def test_start_step_drops_rows_logged_after_it(tmp_path):
    w = MetricWriter(str(tmp_path), 10, progress=False, tensorboard=False)
    for step in range(1, 6):
        w.write(step, {"loss": float(step)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "split": "tra')  # a kill mid-line
    w = MetricWriter(str(tmp_path), 10, start_step=3, progress=False, tensorboard=False)
    for step in range(4, 7):
        w.write(step, {"loss": 10.0 + step})
    w.close()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 14.0, 15.0, 16.0]


def test_tensorboard_names_are_legal(tmp_path, caplog):
    name = "data/skipped/nothing supervised within seq_len"
    assert tag("train/" + name) == "train/data/skipped/nothing_supervised_within_seq_len"
    with caplog.at_level(logging.DEBUG):
        w = MetricWriter(str(tmp_path), 10, progress=False)
        w.write(1, {name: 3, "loss/caption": 1.5})
        w.close()
    assert not [r for r in caplog.records if "illegal" in r.getMessage()], caplog.text
    assert _rows(tmp_path)[0][name] == 3.0
    (events,) = glob.glob(str(tmp_path / "tensorboard" / "events.*"))
    assert _scalar_tags(events) == {"train/data/skipped/nothing_supervised_within_seq_len", "train/loss/caption"}


def _scalar_tags(path: str) -> set:
    """The tags in a TensorBoard event file (TFRecord framing: length, its CRC, the Event, its CRC)."""
    from tensorboardX.proto import event_pb2
    tags = set()
    with open(path, "rb") as f:
        while header := f.read(12):
            event = event_pb2.Event.FromString(f.read(struct.unpack("<Q", header[:8])[0]))
            f.read(4)
            tags |= {v.tag for v in event.summary.value}
    return tags
