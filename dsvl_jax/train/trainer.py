"""The training loop: config → mesh, data, state (fresh / earlier stage / PyTorch / resumed) → steps,
with metrics, periodic eval (loss) and benchmarks (scores, best checkpoint: `benchmarks`), checkpoints,
preemption and the non-finite-step guard.

    from dsvl_jax.train.trainer import train
    summary = train(config, workdir)      # what `dsvl-train` runs
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import time

import jax
import numpy as np
from flax import traverse_util

from dsvl_jax import sharding
from dsvl_jax.config import VLMConfig
from dsvl_jax.convert import lora_orbax, orbax_io
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.data import loader as data_loader
from dsvl_jax.data import packing as data_packing
from dsvl_jax.data.mixture import SourceConfig
from dsvl_jax.models import lora
from dsvl_jax.models.vlm import DeepseekVL
from dsvl_jax.processing.tokenizer import Tokenizer
from dsvl_jax.runtime import VLM
from dsvl_jax.state import abstract_state, cast_like, init_params, make_state, param_shardings
from dsvl_jax.train import benchmarks, lora_run, stages, validate
from dsvl_jax.train import flops as flops_lib
from dsvl_jax.train.checkpointing import Checkpointer, Preemption
from dsvl_jax.train.metrics import MetricWriter
from dsvl_jax.train.optimizer import make_optimizer
from dsvl_jax.train.stages import reinit
from dsvl_jax.train.step import jit_train_step, make_eval_step, make_train_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


def data_config(config, sources_key: str = "sources", *, num_epochs=None) -> data_loader.DataConfig:
    d = config.data
    srcs = []
    for i, s in enumerate(validate.sources(config, sources_key)):
        s = dict(s)
        try:
            srcs.append(SourceConfig(**s))
        except TypeError as e:
            raise validate.ConfigError(f"config.data.{sources_key}[{i}] = {s}: {e}") from None
    # unset: DataConfig's own default (the one place it is written)
    optional = {} if d.max_skips_in_a_row is None else {"max_skips_in_a_row": d.max_skips_in_a_row}
    try:
        return data_loader.DataConfig(
            sources=tuple(srcs), mm_warmup_steps=d.mm_warmup_steps, modality_grouping=d.modality_grouping,
            pack=d.pack, max_examples_per_row=d.max_examples_per_row, max_images_per_row=d.max_images_per_row,
            long_examples=d.long_examples, tasks=data_loader.DEFAULT_TASKS + tuple(
                t for t in d.tasks if t not in data_loader.DEFAULT_TASKS),
            num_epochs=num_epochs, shard_count=d.shard_count, task_tag_prompt=d.task_tag_prompt, **optional)
    except ValueError as e:
        raise validate.ConfigError(f"config.data.{sources_key}: {e}") from None


def _device_batch(batch, mesh, text_only):
    keys = [k for k in batch if k != "record_index"]
    if text_only:
        keys = [k for k in keys if k not in ("pixel_values", "high_res_pixel_values", "image_mask")]
    return data_loader.global_batch({k: batch[k] for k in keys}, mesh)


def initial_params(config, mcfg: VLMConfig, mesh, writer=None):
    """Fresh init, then (optionally) an earlier stage's Orbax params or a PyTorch checkpoint, then re-init."""
    shardings, abstract = param_shardings(mcfg, mesh)
    fresh = init_params(mcfg, mesh, config.seed)
    src = config.init
    if src.from_checkpoint:
        step = None if src.from_checkpoint_step < 0 else src.from_checkpoint_step
        source = orbax_io.OrbaxSource(src.from_checkpoint, step)
        src_cfg = source.config  # an earlier LoRA stage hands on its model: adapters merged into the kernels
        host = traverse_util.unflatten_dict(lora_orbax.merged(
            src.from_checkpoint, source, traverse_util.flatten_dict(source.params(), sep="/")), sep="/")
        _check_same_architecture(src_cfg, mcfg, src.from_checkpoint)
        params = jax.tree.map(lambda x, s, a: jax.device_put(np.asarray(x).astype(a.dtype), s), host, shardings,
                              abstract)
        del host
    elif src.from_pretrained:
        vlm = load_pretrained(src.from_pretrained, dtype=mcfg.param_dtype, mesh=mesh)
        _check_same_architecture(vlm.config, mcfg, src.from_pretrained)
        params = _fill_missing(vlm.params, fresh)
    else:
        return fresh
    params = cast_like(params, abstract)
    return reinit(params, fresh, tuple(src.reinit))


def _fill_missing(loaded, fresh):
    """Params a checkpoint layout cannot hold (e.g. never-used norms absent from the HF port) come from init."""
    a, b = traverse_util.flatten_dict(loaded, sep="/"), traverse_util.flatten_dict(fresh, sep="/")
    return traverse_util.unflatten_dict({k: a.get(k, v) for k, v in b.items()}, sep="/")


def _arch(cfg: VLMConfig):
    return dataclasses.replace(cfg.without_remat(), dtype="float32", param_dtype="float32",
                               sam_attention_impl="auto", unused_hybrid_norms=False)


def _check_same_architecture(src: VLMConfig, dst: VLMConfig, where: str):
    if _arch(src) != _arch(dst):
        diff = [f.name for f in dataclasses.fields(VLMConfig)
                if getattr(_arch(src), f.name) != getattr(_arch(dst), f.name)]
        raise validate.ConfigError(f"{where}: its model differs from config.model in {diff}")


def _copy_tokenizer(path: str, workdir: str):
    """The tokenizer travels with the checkpoints (conversion and chat read it from the workdir)."""
    if jax.process_index() != 0 or path.startswith("gs://"):
        return
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    # Under the name `Tokenizer.from_file(folder)` looks for: a sentencepiece `foo.model` becomes tokenizer.model.
    main = "tokenizer.model" if path.endswith(".model") else "tokenizer.json"
    copies = [(path, main)] + [(os.path.join(folder, n), n) for n in ("tokenizer_config.json", "special_tokens_map.json")
                               if os.path.exists(os.path.join(folder, n))]
    for src, n in copies:
        dst = os.path.join(workdir, n)
        if not os.path.exists(dst):  # copy, then rename: a run killed mid-copy never leaves half a file here
            shutil.copy2(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)


def train(config, workdir: str) -> dict:
    """Run (or resume) `config` in `workdir`; returns the last window's metrics and the run's counters.

    SIGTERM and SIGINT stop it cleanly: during start-up at once (`checkpointing.Interrupted`; nothing new to
    save), later after the current step, or at once while the data pipeline is stuck skipping records; the
    step reached is saved and the summary says so (`signal`, `saved_step`)."""
    preempt = Preemption()
    try:
        return _train(config, workdir, preempt)
    finally:
        preempt.restore_handlers()


def _train(config, workdir: str, preempt: Preemption) -> dict:
    mcfg = validate.check(config)
    os.makedirs(workdir, exist_ok=True)
    devices = jax.devices()[:config.mesh.devices] if config.mesh.devices else None
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices,
                              slices=config.mesh.get("slices", 1))
    tokenizer = Tokenizer.from_file(config.data.tokenizer)
    if tokenizer.image_token_id != mcfg.image_token_id or tokenizer.vocab_size > mcfg.text.vocab_size:
        raise validate.ConfigError(
            f"tokenizer {config.data.tokenizer}: image id {tokenizer.image_token_id} / vocab {tokenizer.vocab_size} "
            f"do not fit the model (image_token_id {mcfg.image_token_id}, vocab_size {mcfg.text.vocab_size})")
    # read once, before anything trains: a benchmark file with no usable row is a ConfigError here
    bench = benchmarks.load(benchmarks.specs(config), tokenizer, mcfg) if config.benchmark_every else []
    # One process alone can stop inside the pipeline; several must agree first (at the end of a step).
    single = jax.process_count() == 1
    dc = data_config(config)
    try:
        it = data_loader.make_train_iterator(dc, mcfg, tokenizer, batch_size=config.batch_size,
                                             seq_len=config.seq_len, seed=config.seed,
                                             worker_count=config.data.workers,
                                             interrupt=preempt.local if single else None)
    except (OSError, ValueError) as e:  # a shard glob that matches nothing, too few records for the shards, ...
        raise validate.ConfigError(f"config.data.sources: {e}") from None
    num_tasks = len(it.task_vocabulary)
    spec = lora_run.spec(config)  # None: no LoRA
    patterns = lora_run.base_patterns(config) if spec else stages.patterns_for(config.stage, tuple(config.trainable))
    _, abstract = param_shardings(mcfg, mesh)
    mask = stages.trainable_mask(abstract, patterns)
    n_train, n_total = stages.count(abstract, mask)
    tx, lr_fn = make_optimizer(config.optimizer, config.total_steps, mask)
    ckpt = Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save, frozen_mask=mask if spec else None)
    latest = ckpt.latest_step()
    if latest is not None:  # checked before anything in the workdir is overwritten
        _check_resumable(ckpt, latest, abstract, config, workdir, spec)
    if jax.process_index() == 0:
        orbax_io.write_model_config(workdir, mcfg)
        if spec:  # what dsvl-convert needs to export the adapters (--to peft) or merge them (--merge)
            lora_orbax.write_meta(workdir, spec, patterns)
        _copy_tokenizer(config.data.tokenizer, workdir)
        with open(os.path.join(workdir, "train_config.json.tmp"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(os.path.join(workdir, "train_config.json.tmp"), os.path.join(workdir, "train_config.json"))
    best = benchmarks.Best(workdir, config.keep_best, mcfg) if config.keep_best else None
    module = DeepseekVL(mcfg)
    target = abstract_state(mcfg, mesh, tx, mask, spec)  # the state's shardings, restored or stepped
    if latest is not None:
        state = ckpt.restore(latest, target, it)
    else:
        adapters = lora_run.initial_adapters(config, mcfg, mesh, spec) if spec else None
        state = make_state(initial_params(config, mcfg, mesh), tx, mask, mesh, mcfg, adapters, spec)
    what = f"stage {config.stage}"
    if spec:
        n_adapters = lora_run.count(state["lora"])
        n_train, n_total = n_train + n_adapters, n_total + n_adapters
        what = f"LoRA r={spec.rank} on {list(spec.targets)}" + (f" + {list(config.lora.full)} in full"
                                                                if config.lora.full else "")
    start = latest or 0
    stop = config.stop_at_step or config.total_steps
    writer = MetricWriter(workdir, stop, start)
    if latest is not None:
        writer.log(f"resumed from {workdir} at step {latest}")
    writer.log(f"{n_train:,} of {n_total:,} params trained ({what}); mesh {dict(mesh.shape)}; "
               f"{num_tasks} task tags; steps {start}→{stop}"
               + (f" of a {config.total_steps}-step schedule" if stop < config.total_steps else "")
               + (" (nothing to train)" if start >= stop else ""))

    kw = dict(num_tasks=num_tasks, grad_accum=config.grad_accum, loss_chunk=config.loss_chunk)
    steps = {t: jit_train_step(make_train_step(module, tx, mask, lr_fn, text_only=t, lora_spec=spec,
                                               seed=config.seed, **kw), target)
             for t in (False, True)}
    peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, config.peak_tflops)
    # FLOPs actually computed: every image slot is encoded (padding slots too), text-only steps encode none.
    flops = {t: flops_lib.train_flops_per_step(
        mcfg, batch_rows=config.batch_size, seq_len=config.seq_len,
        images_per_step=0 if t else config.batch_size * config.data.max_images_per_row, trainable_patterns=patterns,
        text_only=t, loss_chunk=config.loss_chunk, num_tasks=num_tasks, lora_spec=spec) for t in (False, True)}
    summary, window, t_last = {}, [], time.perf_counter()
    preempt.arm()  # from here a signal saves what was trained
    try:
        with jax.set_mesh(mesh):
            for step in range(start, stop):
                before = it.get_state() if single else None
                try:
                    batch = next(it)
                except data_packing.Interrupted:  # a signal while the pipeline skipped records
                    it.set_state(before)  # the data of this step is read again on resume
                    saved = step > start and ckpt.latest_step() != step
                    if saved:
                        ckpt.save(step, state, it, force=True)
                    summary.update(signal=_signal_name(preempt), saved_step=step if saved else None)
                    break
                except data_packing.TooManySkips as e:
                    raise validate.ConfigError(_skips_message(e, config)) from None
                text_only = bool(it.step_is_text_only(step)) if config.data.modality_grouping else \
                    (jax.process_count() == 1 and not batch["image_mask"].any())
                state, m = steps[text_only](state, _device_batch(batch, mesh, text_only))
                images = int(batch["image_mask"].sum()) * jax.process_count()
                window.append((m, images, text_only))
                done = step + 1
                writer.advance()
                preempted = preempt.requested()
                log_now = done % config.log_every == 0 or done == stop
                save_now = done % config.checkpoint.every == 0 or done == stop or preempted
                if log_now:
                    summary = _log_window(writer, done, window, time.perf_counter() - t_last, config, flops,
                                          peak, it, state, mesh.size)
                    window, t_last = [], time.perf_counter()
                if log_now or save_now:  # one read of the counter a window (no device sync per step), and
                    _check_diverged(state, done, config, ckpt, workdir)  # a diverged state is never saved
                if config.eval_every and done % config.eval_every == 0 and validate.sources(config, "eval_sources"):
                    summary.update(evaluate(config, mcfg, module, lora.with_adapters(state["params"], state.get("lora")),
                                            tokenizer, mesh, writer, done, spec))
                if bench and done % config.benchmark_every == 0:
                    live = lora.merge(state["params"], state["lora"], spec) if spec else state["params"]
                    summary.update(_benchmark(bench, best, mcfg, live, mesh, writer, workdir, done))
                if save_now:
                    ckpt.save(done, state, it, force=True)
                if preempted:
                    summary.update(signal=_signal_name(preempt), saved_step=done)
                    break
            else:
                if stop < config.total_steps and start < stop:
                    summary["stopped_at"] = stop
        ckpt.wait()
        if "signal" in summary:
            writer.log(f"{summary['signal']}: " + (f"saved step {summary['saved_step']}, exiting"
                                                    if summary["saved_step"] is not None else
                                                    "nothing trained since the last checkpoint, exiting"))
    finally:
        writer.close()
        ckpt.close()
    counters = jax.device_get({k: state[k] for k in ("step", "skipped")})
    summary.update(step=int(counters["step"]), skipped=int(counters["skipped"]), data=it.stats().as_dict())
    return summary


def _signal_name(preempt: Preemption) -> str:
    # another process may have received it: every process stops, this one without a signal of its own
    return signal.Signals(preempt.signum).name if preempt.signum else "SIGTERM"


def _check_diverged(state, done: int, config, ckpt: Checkpointer, workdir: str) -> None:
    bad = int(jax.device_get(state["bad_steps"]))
    if bad >= config.max_bad_steps:
        ckpt.wait()  # the message names a checkpoint that is finished on disk
        raise TrainingDiverged(
            f"{bad} non-finite steps in a row at step {done} (limit config.max_bad_steps={config.max_bad_steps}); "
            f"the last good checkpoint is step {ckpt.latest_step()} in {workdir}")


def _check_resumable(ckpt: Checkpointer, step: int, abstract, config, workdir: str, spec=None) -> None:
    """The workdir's newest checkpoint fits this config: same param shapes, schedule not shorter than it."""
    if step > config.total_steps:
        raise validate.ConfigError(
            f"{workdir} holds checkpoint {step}, past config.total_steps={config.total_steps}: it was trained on a "
            f"longer schedule; keep total_steps ≥ {step} (config.stop_at_step stops earlier) or use a new workdir")
    if ckpt.has_adapters(step) != (spec is not None):
        raise validate.ConfigError(
            f"{workdir} holds checkpoint {step} of a {'LoRA' if ckpt.has_adapters(step) else 'full'} run, and "
            f"config.lora.rank={config.lora.rank} asks for {'LoRA' if spec else 'no LoRA'}: resume with the config "
            f"it was trained with (its train_config.json) or use a new workdir")
    saved = ckpt.saved_param_shapes(step)
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    differ = [k for k in want if k in saved and saved[k] != want[k]]
    if differ:
        detail = f"param {differ[0]} has shape {saved[differ[0]]} there, {want[differ[0]]} in config.model"
    elif missing or extra:
        detail = f"config.model has params it lacks {missing[:3]} and lacks params it has {extra[:3]}"
    else:
        return
    n = len(differ) + len(missing) + len(extra)
    raise validate.ConfigError(
        f"{workdir} holds a different model (checkpoint {step}: {detail}; {n} param(s) differ): resume with the "
        f"config it was trained with (its train_config.json) or use a new workdir")


def _skips_message(e: data_packing.TooManySkips, config) -> str:
    """What a stream that can make no row skipped, and the change that lets its records through."""
    counts = ", ".join(f"{n} × {reason}" for reason, n in e.reasons.most_common())
    fixes = []
    if e.need_seq_len and e.need_seq_len[0] > config.seq_len:
        least, most = e.need_seq_len
        fixes.append(f"raise config.seq_len (now {config.seq_len}) to ≥ {least}"
                     + (f" (≥ {most} fits all of them)" if most > least else ""))
    if e.need_images > config.data.max_images_per_row:
        fixes.append(f"raise config.data.max_images_per_row to ≥ {e.need_images}")
    fix = " and ".join(fixes) or "check the data"
    return (f"the {e.stream or 'data'} stream skipped {e.limit} records in a row and made no row ({counts}; e.g. "
            f"{e.example}): {fix} (the limit is config.data.max_skips_in_a_row={e.limit})")


def _log_window(writer, done, window, seconds, config, per_step, peak, it, state, mesh_size):
    ms = jax.device_get([w[0] for w in window])
    n = len(ms)
    ok = np.array([bool(m["ok"]) for m in ms])
    losses = np.array([float(m["loss"]) for m in ms])
    tokens = sum(float(m["tokens"]) for m in ms)
    task_sum = sum(np.asarray(m["task_loss_sum"]) for m in ms)
    task_cnt = sum(np.asarray(m["task_count"]) for m in ms)
    images = sum(w[1] for w in window)
    fl = sum(per_step[w[2]]["total"] for w in window)
    fl_causal = sum(per_step[w[2]]["total_causal"] for w in window)
    skipped = int(jax.device_get(state["skipped"]))
    scalars = {
        "loss": float(losses[ok].mean()) if ok.any() else float("nan"),
        "grad_norm": float(np.mean([float(m["grad_norm"]) for m, k in zip(ms, ok) if k])) if ok.any() else float("nan"),
        "lr": float(ms[-1]["lr"]),
        "tokens_per_s": tokens / seconds,
        "images_per_s": images / seconds,
        "steps_per_s": n / seconds,
        "skipped_steps": skipped,
        "bad_steps_in_window": int((~ok).sum()),
    }
    if peak:
        scalars["mfu"] = flops_lib.mfu(fl / n, seconds / n, mesh_size, peak)
        scalars["mfu_causal"] = flops_lib.mfu(fl_causal / n, seconds / n, mesh_size, peak)
    for i, name in enumerate(it.task_vocabulary):
        if task_cnt[i] > 0:
            scalars[f"loss/{name}"] = float(task_sum[i] / task_cnt[i])
    scalars.update(it.stats().as_dict())
    writer.write(done, scalars)
    return scalars


def _benchmark(bench, best, mcfg, params, mesh, writer, workdir: str, step: int) -> dict:
    """Score the benchmarks on the live params: the VLM wraps them where they are, on the training mesh."""
    t0 = time.perf_counter()
    scalars, results = benchmarks.score(bench, VLM(mcfg, params, mesh))
    writer.write(step, scalars, prefix="bench")
    benchmarks.write_predictions(workdir, step, results)
    saved = best is not None and best.update(step, scalars, params)
    scores = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k.endswith("/score"))
    writer.log(f"step {step}: {scores} ({time.perf_counter() - t0:.1f}s)"
               + (f"; best {best.metric} so far: params in {best.dir}" if saved else ""))
    return {f"bench/{k}": v for k, v in scalars.items()}


def evaluate(config, mcfg, module, params, tokenizer, mesh, writer, step, lora_spec=None) -> dict:
    """Loss on the held-out sources (one pass of `eval_steps` batches); a LoRA run's `params` hold the adapters."""
    it = data_loader.make_train_iterator(data_config(config, "eval_sources"), mcfg, tokenizer,
                                         batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed + 1)
    fn = jax.jit(make_eval_step(module, num_tasks=len(it.task_vocabulary), loss_chunk=config.loss_chunk,
                                lora_spec=lora_spec))
    tot, cnt = 0.0, 0.0
    for _ in range(config.eval_steps):
        out = jax.device_get(fn(params, _device_batch(next(it), mesh, False)))
        tot += float(out["loss_sum"])
        cnt += float(out["tokens"])
    res = {"eval_loss": tot / max(cnt, 1.0)}
    writer.write(step, {"loss": res["eval_loss"]}, prefix="eval")
    return res
