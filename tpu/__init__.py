"""Cloud TPU launch scripts and the loopback multi-process runner (see tpu/README.md)."""
