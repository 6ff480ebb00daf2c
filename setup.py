"""retro_jax: DeepMind's RETRO (arXiv 2112.04426) in JAX/Flax with a ScaNN retrieval side."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "absl-py",
    "ml_collections",
    "numpy>=2",
    "scann>=1.4",
    "transformers>=4.40",
    "tokenizers",
    "sentencepiece",
    "safetensors",
    "tqdm",
    "tensorboardX",
    "matplotlib",  # the quickstart's and experiments' plots (required: reporting.py)
    "grain",  # the training data order: its random-access index shuffle (training/data.py)
    "h11",  # HTTP/1.1 parsing of the retrieval service (retrieval/serve/server.py)
]

EXTRAS = {
    # torch is only a test-time reference (transformers' PyTorch BertModel).  The pin takes
    # the CPU wheel; an unpinned torch drags in a multi-GB CUDA build.
    # apache-beam: tests/test_beam.py runs the Beam pipelines on the DirectRunner.
    "test": ["pytest", "pytest-xdist", "torch==2.13.0", "apache-beam"],
    "datasets": ["datasets"],
    "beam": ["apache-beam"],  # build_db / precompute_neighbors --runner=... (Beam pipelines)
    # experiments/benchmarks: faiss is the alternative index the ScaNN benchmark compares with.
    "bench": ["faiss-cpu"],
}

setuptools.setup(
    name="retro_jax",
    version="0.1.0",
    description="Retrieval-Enhanced Transformer (RETRO) in JAX/Flax with ScaNN retrieval",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["retro_jax", "retro_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
