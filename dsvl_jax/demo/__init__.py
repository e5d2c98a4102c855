"""`make demo` / `python -m dsvl_jax.demo`: a tiny hybrid DeepSeek-VL learns the embedded task suite on a CPU.

The whole stack, nothing downloaded: the suite (`dsvl_jax.tasks`) written as ArrayRecord shards and read by
the Grain pipeline; a BPE tokenizer trained on its texts; a hybrid SAM + SigLIP model trained from random
weights through the paper's three stages by the real trainer (Orbax checkpoints, metrics.jsonl, TensorBoard);
exact-match tables per family before and after, from greedy KV-cache generation; the final params exported as
an HF-port folder that transformers loads to answer a held-out question (compared with our answer).

Departures from the paper, because nothing here is pretrained: stage 3 trains SAM too (`--freeze-sam`
keeps the paper's frozen SAM), stage 1 pairs images with transcriptions (`captions`), and the system
prompt is short (`data.SYSTEM_PROMPT`). The paper's configs in `configs/` are untouched.
"""
