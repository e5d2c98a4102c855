"""Benchmark evaluation (`dsvl-eval`): file formats (`formats`), metrics (`metrics`, `vqa_normalize`), batched
greedy answering (`runner`), scores per category (`scoring`), and the suite as an MMBench TSV (`suite_tsv`).

Nothing is imported here, so `import dsvl_jax.eval.metrics` stays free of jax.
"""
