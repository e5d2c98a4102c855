"""dsvl_jax: DeepSeek-VL in JAX/Flax — train on TPU, test on a CPU mesh, convert to and from PyTorch."""
from setuptools import find_packages, setup

# Versions the suite passes with. These APIs move fast; bump them together and rerun `make test`.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array_record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "tokenizers==0.23.3",
    "ml-collections==1.1.0",
    "safetensors==0.8.0",
    "numpy>=2.0",
    "pillow>=10",
    "absl-py",
    "tqdm",
    "tensorboardX",
    "psutil",
    "matplotlib==3.11.2",  # the demo's report.png
    "starlette==1.10.0",  # dsvl-serve: the HTTP app
    "uvicorn==0.55.0",  # dsvl-serve: the HTTP server
]

TEST_REQUIRES = [
    "torch==2.13.0",  # a CPU build lies on the dev machines' disk; other versions download GBs
    "transformers==5.24.0",
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",  # make test: two workers on a 2-core machine (one compiles while the other runs)
    "hypothesis",
    "openai==3.63.0",  # drives dsvl-serve in tests/test_serve.py
    "httpx==0.29.0",  # raw (malformed) requests to dsvl-serve
    "peft==0.22.0",  # loads our LoRA exports (tests/test_lora*.py)
]

setup(
    name="dsvl_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["dsvl_jax", "dsvl_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={
        "console_scripts": [
            "dsvl-convert=dsvl_jax.convert.cli:main",
            "dsvl-chat=dsvl_jax.generation.chat_cli:main",
            "dsvl-data=dsvl_jax.data.build_cli:main",
            "dsvl-train=dsvl_jax.train.cli:run",
            "dsvl-eval=dsvl_jax.eval.cli:main",
            "dsvl-serve=dsvl_jax.serve.cli:main",
        ]
    },
)
