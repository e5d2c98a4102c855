"""Training data: one record format, a build tool, and a resumable Grain pipeline to packed batches.

- `records`     the record format (segments + encoded images), ArrayRecord shards, the tfds route
- `shards`      shard files and their manifest: written whole or not at all, read as the manifest lists
- `build_cli`   `dsvl-data`: LLaVA / caption / interleaved / text corpora -> validated shards + report
- `transforms`  record -> tokens, supervision flags and model image views (the processor's own code)
- `packing`     examples -> fixed-shape rows (segments, positions, image slots); skip counters
- `mixture`     text:multimodal schedule with warm-up and modality grouping; sources within a modality
- `loader`      `make_train_iterator` (checkpointable, multi-host, worker processes) and `global_batch`
- `synthetic`   small generated corpora for tests, benchmarks and the demo

`records`, `transforms` and `synthetic` import neither jax nor the model, so Grain worker processes stay
light; `loader` (jax comes with Grain anyway) adds the batch sharding for `global_batch`.
"""
