"""Checkpoints in and out: PyTorch folders (HF-port and official layouts) and Orbax training checkpoints.

- `keymap`          one declarative table from our param paths to both PyTorch layouts (read both ways)
- `config_io`       config.json of either layout ↔ `VLMConfig`
- `safetensors_io`  a reader and a streaming writer, one tensor at a time; the safetensors dtype table
- `load`            `load_pretrained`: a folder → `dsvl_jax.VLM` (PyTorch layouts or Orbax)
- `export`          `save_pretrained`: params → a PyTorch folder, written atomically
- `orbax_io`        the training-checkpoint contract; params-only reads and writes
- `stream`          PyTorch layout → PyTorch layout without building the param tree
- `state_dict`      a live torch model's state_dict as a reader (`params_from_torch`)
- `cli`             `dsvl-convert` (also `tools/convert_checkpoint.py`)

Shapes come from `dsvl_jax.state` (the params a config builds); errors are `dsvl_jax.errors`'
`CheckpointError` / `ConfigError`.
"""
