"""ftlib: fine-tuning research for large language models in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="ftlib",
    version="0.1.0",
    description="Parameter-efficient fine-tuning of LLMs in JAX / Flax NNX",
    packages=find_packages(include=["ftlib", "ftlib.*"]),
    package_data={"ftlib": ["*.cc", "*.h"]},  # compiled on first use (ftlib/ffi_kernels.py)
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12,<0.13",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "ml_collections>=1.1",
        "absl-py",
        "numpy",
        "transformers>=5,<6",
        "tokenizers",
        "safetensors",
        "gguf>=0.19",
        "tqdm",
        "tensorboardX",
        # fp32 CPU products in MKL (ftlib/mkl_gemm.py); elsewhere they stay in XLA.
        'mkl>=2025; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    extras_require={
        "test": ["pytest>=8", "matplotlib"],  # matplotlib: the notebooks run in the suite
        # PyTorch references for parity/export tests and HF interop. torch stays pinned to the
        # CPU build shipped on these machines: an unpinned torch pulls a multi-GB CUDA build.
        "hf": ["torch==2.13.0", "peft>=0.21,<0.22"],
    },
)
