import os

# The demo is sized for a CPU. Without this, an installed libtpu makes JAX probe for a TPU first and print
# alarming host-bound warnings; set JAX_PLATFORMS yourself to run it elsewhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from dsvl_jax.demo.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
