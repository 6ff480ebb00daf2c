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
    # lm-eval: tests/test_harness.py runs the lm-evaluation-harness adapter on a local task.
    # gguf + accelerate: transformers' GGUF loading, the reference of the GGUF import tests.
    "test": ["pytest", "pytest-xdist", "torch==2.13.0", "apache-beam", "lm-eval", "gguf",
             "accelerate"],
    "lm_eval": ["lm-eval"],
    # import_lm of .gguf files (llama.cpp's format); safetensors imports need nothing more.
    "lm": ["gguf"],
    # Accelerators: JAX's own wheels with their CUDA libraries, or libtpu (docs/your_corpus.md).
    "cuda": ["jax[cuda12]"],
    "tpu": ["jax[tpu]"],
    "gcs": ["gcsfs"],  # gs:// paths (retro_jax/remote.py)  # retro-lm-eval / retro_jax.harness (lm-evaluation-harness)
    "datasets": ["datasets"],
    "beam": ["apache-beam"],  # build_db / precompute_neighbors --runner=... (Beam pipelines)
    # experiments/benchmarks: faiss is the alternative index the ScaNN benchmark compares with.
    "bench": ["faiss-cpu"],
}

# Console commands (retro_jax/commands.py runs each module as `python -m` does).
CONSOLE_SCRIPTS = [
    "retro-quickstart = retro_jax.commands:quickstart",
    "retro-train-tokenizer = retro_jax.commands:train_tokenizer",
    "retro-build-db = retro_jax.commands:build_db",
    "retro-chunk-store = retro_jax.commands:chunk_store",
    "retro-precompute-neighbors = retro_jax.commands:precompute_neighbors",
    "retro-show-neighbors = retro_jax.commands:show_neighbors",
    "retro-serve = retro_jax.commands:serve",
    "retro-edit-db = retro_jax.commands:edit_db",
    "retro-train = retro_jax.commands:train",
    "retro-evaluate = retro_jax.commands:evaluate",
    "retro-generate = retro_jax.commands:generate",
    "retro-verify = retro_jax.commands:verify",
    "retro-lm-eval = retro_jax.commands:lm_eval",
    "retro-import-lm = retro_jax.commands:import_lm",
    "retro-export-lm = retro_jax.commands:export_lm",
]

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
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    license="Apache-2.0",
)
