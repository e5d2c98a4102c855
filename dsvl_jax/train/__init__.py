"""Training: a config file → sharded steps on a TPU slice (or a CPU mesh), checkpointed and resumable.

- `config_base`   the base training config every config file starts from; the paper's stages (Table 4)
- `config_files`  config files by path (`load_config("configs/x.py:arg")`), the TPU slice layouts
- `validate`      config checks that fail before anything compiles (`ConfigError`)
- `stages`        which params each stage trains (path patterns), `reinit`
- `optimizer`     schedules and the AdamW chain; `loss`: chunked cross-entropy
- `step`          the train / eval step over a `dsvl_jax.state.TrainState`
- `checkpointing` Orbax saves of state + data iterator, resume, preemption
- `metrics`, `flops` console / TensorBoard / JSONL metrics; analytic FLOPs and MFU
- `trainer`       the loop (`train(config, workdir)`); `cli`: `dsvl-train`
- `aot`           ahead-of-time compile of the step for a TPU topology (`tools/aot_compile.py`)
"""
