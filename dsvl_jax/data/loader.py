"""The training input pipeline: sources -> examples -> packed rows -> mixed batches -> global jax.Array.

Per modality (text, multimodal) one stream, built on Grain:

    each source: MapDataset.source(files)[shard::shard_count] -> tag -> shuffle(seed) -> repeat()
    mix(sources, weights)  -> stream position n -> record code      (random access, stateless)
    .map(ExampleMaker)     -> example or skip marker                 (decoding: the expensive part)
    .to_iter_dataset()     -> .mp_prefetch(worker_count)            (order preserved: no filtering
                                                                      happens before this point)
    PackIterDataset        -> fixed-shape rows, skips counted        (main process)

and on top `MixtureBatchIterDataset`, which draws each row of step s from the text or the
multimodal stream as `ModalitySchedule.row_modality(s, row)` says and stacks them into a batch. Its
state (step, each stream's packer and Grain state) is plain JSON: it saves with
`grain.checkpoint.CheckpointSave(it)` inside an Orbax Composite and resumes exactly. Because the
worker processes only map, the batches are the same for any worker count.

Data shards: the corpus is read as `shard_count` disjoint shards (default: one per process). Shard k
has its own streams and fills the k-th block of batch/shard_count rows of every global batch; a
process reads the shards of its own rows. A fixed shard_count makes the global batches independent
of the process count: one process reading 2 shards yields what 2 processes reading one each assemble.

`record_index[b, e]` holds a *record code* per example slot: code = (n·K + k)·2 + m for stream
position n of modality m in data shard k of K; each code appears once in a run (-1 = empty slot,
-2 = the continuation of a document split across rows). int32 allows 2^31 examples in a run, about
5x the paper's largest stage (7B stage 2: 42k steps x 2304 rows x a few examples per row).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Sequence

import grain
import jax
import numpy as np

from ..processing import image as image_lib
from ..sharding import batch_sharding
from . import records as R
from .mixture import MODALITIES, ModalitySchedule, SourceConfig, mix_map_datasets
from .packing import SPLIT, TRUNCATE, DataStats, PackIterDataset, RowSpec, TooManySkips
from .transforms import DEFAULT_TASKS, ExampleMaker

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids", "pixel_values",
              "high_res_pixel_values", "image_mask", "task_ids", "record_index")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...]
    mm_warmup_steps: int = 0  # multimodal share of rows ramps 0 -> target over these steps
    modality_grouping: bool = False  # every step is all-text or all-multimodal (paper §4.4)
    pack: bool = True  # several examples per row (stage 2); False = one example per row (stages 1, 3)
    max_examples_per_row: int = 16
    max_images_per_row: int = 4
    long_examples: str = SPLIT  # documents longer than a row: "split" over rows or "truncate"
    tasks: tuple[str, ...] = DEFAULT_TASKS
    max_image_pixels: int = image_lib.DEFAULT_MAX_PIXELS
    num_epochs: int | None = None  # None: repeat forever (training)
    read_threads: int = 1  # decoding threads per process (main, or each worker)
    read_buffer: int = 16
    worker_buffer: int = 2  # elements each worker process keeps ready
    shard_count: int = 0  # disjoint data shards (a multiple of the process count); 0 = one per process
    task_tag_prompt: bool = False  # conversations: "[task] " in front of the first instruction
    # A stream that skips this many records in a row (none fits seq_len, say) raises packing.TooManySkips
    # instead of reading forever; 0 = no limit.
    max_skips_in_a_row: int = 1000

    def __post_init__(self):
        if not self.sources:
            raise ValueError("DataConfig needs at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if self.long_examples not in (SPLIT, TRUNCATE):
            raise ValueError(f"long_examples={self.long_examples!r}: expected {SPLIT!r} or {TRUNCATE!r}")
        if self.shard_count < 0:
            raise ValueError(f"shard_count={self.shard_count} must be >= 0 (0 = one shard per process)")
        if self.max_skips_in_a_row < 0:
            raise ValueError(f"max_skips_in_a_row={self.max_skips_in_a_row} must be >= 0 (0 = no limit)")

    def schedule(self, seed: int) -> ModalitySchedule:
        return ModalitySchedule.from_sources(self.sources, warmup_steps=self.mm_warmup_steps,
                                             grouping=self.modality_grouping, seed=seed)


def row_spec(data_config: DataConfig, model_config, tokenizer, seq_len: int) -> RowSpec:
    return RowSpec(
        seq_len=seq_len,
        max_images=data_config.max_images_per_row,
        max_examples=data_config.max_examples_per_row if data_config.pack else 1,
        num_image_tokens=model_config.num_image_tokens,
        image_token_id=model_config.image_token_id,
        pad_id=tokenizer.pad_id,
        image_size=model_config.siglip.image_size,
        high_res_size=model_config.sam.image_size if model_config.is_hybrid else None,
        long_examples=data_config.long_examples,
    )


# ---------------------------------------------------------------------------------------------
# Record codes (the record_index batch key)
# ---------------------------------------------------------------------------------------------
def record_code(position: int, shard: int, shard_count: int, modality: int) -> int:
    return (position * shard_count + shard) * len(MODALITIES) + modality


def decode_record_code(code: int, shard_count: int) -> tuple[int, int, int]:
    """code -> (stream position, data shard, modality)."""
    q, modality = divmod(int(code), len(MODALITIES))
    position, shard = divmod(q, shard_count)
    return position, shard, modality


@dataclasses.dataclass(frozen=True)
class _Tag:
    """raw bytes -> {"raw", "source"} (a picklable callable for worker processes)."""

    source: str

    def __call__(self, raw: bytes) -> dict:
        return {"raw": raw, "source": self.source}


@dataclasses.dataclass(frozen=True)
class _Code:
    shard: int
    shard_count: int
    modality: int

    def __call__(self, position: int, item: dict) -> dict:
        code = record_code(position, self.shard, self.shard_count, self.modality)
        if code >= 2**31:
            raise OverflowError(f"record code {code} of stream position {position} does not fit int32")
        return {**item, "code": code}


def _stream_seed(seed: int, modality: int, k: int) -> int:
    return (seed * 1_000_003 + modality * 7_919 + k) % 2**32


GENERATOR_PACKAGE = "dsvl_jax."


def open_source(src: SourceConfig):
    if src.generator:
        module, _, name = src.generator.partition(":")
        if not module.startswith(GENERATOR_PACKAGE):  # a config names a class; it never imports foreign code
            raise ValueError(f"source {src.name!r}: generator {src.generator!r} must live in the "
                             f"{GENERATOR_PACKAGE[:-1]} package")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"source {src.name!r}: cannot load generator {src.generator!r}: {e}") from None
        return cls(**src.generator_args)
    return R.tfds_source(src.tfds_dir) if src.tfds_dir else R.array_record_source(src.paths)


def record_stream(sources: Sequence[SourceConfig], modality: int, *, seed: int, process_index: int,
                  process_count: int, num_epochs: int | None) -> grain.MapDataset:
    """Random-access stream of {"raw", "source", "code"} of one modality in data shard `process_index`
    of `process_count` (the names predate data shards: a process used to be exactly one shard)."""
    parts = []
    for k, src in enumerate(sources):
        ds = grain.MapDataset.source(open_source(src))
        if len(ds) < process_count:
            raise ValueError(f"source {src.name!r} has {len(ds)} records, fewer than the {process_count} data shards")
        ds = ds[process_index::process_count].map(_Tag(src.name))
        parts.append(ds.shuffle(seed=_stream_seed(seed, modality, k)).repeat(num_epochs))
    mixed = mix_map_datasets(parts, [s.weight for s in sources])
    return mixed.map_with_index(_Code(process_index, process_count, modality))


# ---------------------------------------------------------------------------------------------
# Mixing rows into batches
# ---------------------------------------------------------------------------------------------
class MixtureBatchIterDataset(grain.IterDataset):
    """Rows from the per-(data shard, modality) packers, picked by the schedule, stacked into a local batch."""

    def __init__(self, streams: dict[tuple[int, int], grain.IterDataset], schedule: ModalitySchedule, *,
                 local_batch: int, process_index: int, process_count: int, task_vocabulary: tuple[str, ...],
                 records: dict[tuple[int, int], grain.MapDataset], shard_count: int | None = None):
        super().__init__(list(streams.values()))
        self._keys = list(streams)  # (data shard, modality)
        self.task_vocabulary = task_vocabulary
        self._records = records  # per (data shard, modality), the stream before decoding: code -> record
        self._schedule = schedule
        self._local_batch, self._process_index, self._process_count = local_batch, process_index, process_count
        self._global_batch = local_batch * process_count
        self._shard_count = shard_count or process_count
        self._shard_batch = self._global_batch // self._shard_count  # consecutive rows of one data shard

    def __iter__(self) -> "MixtureBatchIterator":
        return MixtureBatchIterator({k: p.__iter__() for k, p in zip(self._keys, self._parents)}, self)

    def record_key(self, code: int) -> tuple[str, str]:
        """(source name, record id) of a `record_index` code of this process, for a record-id log."""
        position, shard, modality = decode_record_code(code, self._shard_count)
        if (shard, modality) not in self._records:
            raise ValueError(f"record code {code} belongs to data shard {shard}, modality {modality}; "
                             f"process {self._process_index} reads shards {sorted({s for s, _ in self._records})}")
        item = self._records[(shard, modality)][position]
        try:
            return item["source"], R.deserialize(item["raw"]).record_id
        except R.RecordError as e:
            return item["source"], f"<unreadable record: {e.reason}>"

    def __str__(self) -> str:
        return f"MixtureBatchIterDataset({self._schedule}, local_batch={self._local_batch})"


class MixtureBatchIterator(grain.DatasetIterator):
    def __init__(self, streams: dict, dataset: MixtureBatchIterDataset):
        super().__init__(list(streams.values()))
        self._streams = streams
        self.schedule = dataset._schedule
        self._local_batch, self._process_index = dataset._local_batch, dataset._process_index
        self._global_batch, self._shard_batch = dataset._global_batch, dataset._shard_batch
        self._one_shard = len({s for s, _ in streams}) == 1
        self.task_vocabulary = dataset.task_vocabulary  # names of task_ids; 0 = padding
        self.record_key = dataset.record_key  # code -> (source, record id)
        self.step = 0  # index of the next batch

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        rows = []
        for i in range(self._local_batch):
            row = self._process_index * self._local_batch + i
            modality = self.schedule.row_modality(self.step, row, self._global_batch)
            key = (row // self._shard_batch, modality)
            try:
                rows.append(next(self._streams[key]))
            except TooManySkips as e:
                e.stream = self._state_key(key)
                raise
        self.step += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def step_is_text_only(self, step: int | None = None) -> bool:
        """Whether every row of `step` (default: the next batch), on all processes, is text-only."""
        return self.schedule.step_is_text_only(self.step if step is None else step)

    def stats(self) -> DataStats:
        """Skips by reason and packing counters, summed over the streams (survive save/restore)."""
        total = DataStats()
        for it in self._streams.values():
            total = total.merged(it.stats)
        return total

    def _state_key(self, key: tuple[int, int]) -> str:
        shard, modality = key  # one shard per process (the usual case): the modality name alone
        return MODALITIES[modality] if self._one_shard else f"{MODALITIES[modality]}@{shard}"

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "streams": {self._state_key(k): it.get_state() for k, it in self._streams.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = set(state["streams"])
        mine = {self._state_key(k) for k in self._streams}
        if saved != mine:
            raise ValueError(f"iterator state has streams {sorted(saved)}, this pipeline has {sorted(mine)}")
        self.step = int(state["step"])
        for k, it in self._streams.items():
            it.set_state(state["streams"][self._state_key(k)])

    def __str__(self) -> str:
        return "MixtureBatchIterator"


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def make_train_dataset(data_config: DataConfig, model_config, tokenizer, *, batch_size: int, seq_len: int,
                       seed: int, process_index: int | None = None, process_count: int | None = None,
                       worker_count: int = 0, interrupt=None) -> MixtureBatchIterDataset:
    """The pipeline as a Grain IterDataset (see `make_train_iterator`)."""
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"global batch_size={batch_size} is not divisible by process_count={process_count}")
    shard_count = data_config.shard_count or process_count
    if shard_count % process_count or batch_size % shard_count:
        raise ValueError(f"shard_count={shard_count} must be a multiple of process_count={process_count} and "
                         f"divide the global batch_size={batch_size}")
    if worker_count < 0:
        raise ValueError(f"worker_count={worker_count} must be >= 0")
    if worker_count:
        _mark_absl_flags_parsed()
    maker = ExampleMaker(tokenizer, model_config, tasks=data_config.tasks, max_pixels=data_config.max_image_pixels,
                         task_tag_prompt=data_config.task_tag_prompt)
    spec = row_spec(data_config, model_config, tokenizer, seq_len)
    streams, records = {}, {}
    per_process = shard_count // process_count
    for shard in range(process_index * per_process, (process_index + 1) * per_process):
        for m, name in enumerate(MODALITIES):
            sources = [s for s in data_config.sources if s.modality == name]
            if not sources:
                continue
            records[(shard, m)] = record_stream(sources, m, seed=seed, process_index=shard,
                                                process_count=shard_count, num_epochs=data_config.num_epochs)
            it = records[(shard, m)].map(maker).to_iter_dataset(
                grain.ReadOptions(num_threads=data_config.read_threads, prefetch_buffer_size=data_config.read_buffer))
            if worker_count:
                it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                                 per_worker_buffer_size=data_config.worker_buffer))
            streams[(shard, m)] = PackIterDataset(it, spec, max_skips_in_a_row=data_config.max_skips_in_a_row,
                                                  interrupt=interrupt)
    return MixtureBatchIterDataset(streams, data_config.schedule(seed), local_batch=batch_size // process_count,
                                   process_index=process_index, process_count=process_count,
                                   task_vocabulary=maker.task_vocabulary(), records=records,
                                   shard_count=shard_count)


def make_train_iterator(data_config: DataConfig, model_config, tokenizer, *, batch_size: int, seq_len: int,
                        seed: int, process_index: int | None = None, process_count: int | None = None,
                        worker_count: int = 0, interrupt=None) -> MixtureBatchIterator:
    """This process's iterator of local batches (numpy dicts with `BATCH_KEYS`).

    `batch_size` is the *global* batch; each process yields batch_size / process_count rows from its
    own data shards of every source (`data_config.shard_count`, default one per process). The iterator
    has get_state/set_state (save it with `grain.checkpoint.CheckpointSave(it)`), `stats()` for the skip
    counters, `step_is_text_only()` for modality grouping, `task_vocabulary` for `task_ids` and
    `record_key(code)` for the record log.

    A stream that skips `data_config.max_skips_in_a_row` records in a row raises `packing.TooManySkips`;
    `interrupt` (a callable) is polled at every skip and raises `packing.Interrupted` when it returns True.
    """
    ds = make_train_dataset(data_config, model_config, tokenizer, batch_size=batch_size, seq_len=seq_len,
                            seed=seed, process_index=process_index, process_count=process_count,
                            worker_count=worker_count, interrupt=interrupt)
    return iter(ds)


def global_batch(local_batch: dict[str, np.ndarray], mesh) -> dict[str, Any]:
    """Assemble the processes' local batches into global jax.Arrays, batch dim over ("data", "fsdp")."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
            for k, v in local_batch.items()}


@functools.cache
def _mark_absl_flags_parsed() -> None:
    # Grain's worker start-up reads absl flags; outside absl.app.run they are not parsed yet.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
