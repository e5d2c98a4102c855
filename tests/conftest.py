"""Test set-up: 8 forced CPU devices, float32 matmuls at full precision, deterministic seeds."""
import os

# Must happen before JAX initialises its backends.
# The cheaper LLVM pipeline takes about a third off the suite's CPU time (compiles dominate it; measured on the
# quick demo and the sharded-step tests) and keeps float32 semantics: no fast-math, same HLO, same tolerances.
# Subprocesses the tests start inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Identical programs (the same train step in several tests) compile once per run.
jax.config.update("jax_compilation_cache_dir", os.environ.get("DSVL_TEST_JAX_CACHE", "/tmp/dsvl_jax_test_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The trainer tests' corpus on disk: (sources as config dicts, tokenizer.json path). Read-only."""
    from tests.helpers.train_fixtures import make_corpus
    return make_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="session")
def text_corpus(corpus):
    """The corpus' text sources only: every step is text-only, so a run compiles one train step."""
    sources, tokenizer = corpus
    return [s for s in sources if s["modality"] == "text"], tokenizer
