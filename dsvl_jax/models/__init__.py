"""The Flax (linen) model: `vlm.DeepseekVL` = vision towers → aligner → image features spliced into the
image-token positions → the DeepSeek-LLM decoder.

- `siglip`   SigLIP ViT (low resolution; the 1.3B's only tower)
- `sam`      SAM-B ViTDet with decomposed rel-pos attention, necks and the hd down-sampling (7B hybrid)
- `vision`   one tower or the hybrid, and the HF-port / official input contracts
- `aligner`  the VL adaptor (MLP projector)
- `llama`    the decoder (scanned layers, RoPE, KV cache)
- `common`   param factories with logical axis names, norms, activations, sharding constraints, remat
- `vlm`      `DeepseekVL` and `dummy_inputs`

Params carry logical axis names (`dsvl_jax.sharding` maps them onto the mesh); their shapes without
allocating anything: `dsvl_jax.state.abstract_params`. The runtime wrapper is `dsvl_jax.runtime.VLM`.
"""
