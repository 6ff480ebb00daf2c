"""Provenance: whether data was made the way its consumer expects, the one place that says so.

Data records what made it in its manifest: the chunk size it was cut with, the identity of
its tokenizer (kind, sha256, vocabulary size; `LMTokenizer.identity()`) and, for a
database, of the embedder that made its keys.  A consumer states what it expects in an
`Expected`: a model its chunk size, the tokenizer it was trained with and its vocabulary
(`LoadedModel.expected()`), a search the identity of its query embedder.  `check` compares a
manifest with an `Expected`, and `check_compatible` two manifests that are to be mixed (a
database and a query set); a disagreement raises `fileio.ManifestMismatchError` in one line
naming both values and where each came from.

Only recorded identities are compared here.  Whether the files still hold what their
manifests record (hashes, shapes, ids within the vocabulary) is the integrity checks'
business (fileio.py, retro_jax/integrity.py); what belongs to one artefact (a database's
manifest against its own chunk store, a neighbors file against its database) stays with
that artefact's reader.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from retro_jax import fileio

TOKENIZER_KEYS = ("kind", "sha256", "vocab_size")


@dataclasses.dataclass(frozen=True)
class Expected:
  """What a consumer expects of data it opens; a field left None is not checked."""
  chunk_size: int | None = None                 # m the data must be cut with
  tokenizer: Mapping[str, Any] | None = None    # the tokenizer identity it must be made with
  vocab_size: int | None = None                 # its tokenizer's ids must fit (model vocab)
  embedder: Mapping[str, Any] | None = None     # the identity of the query embedder
  source: str = "the caller"                    # who expects it, as errors name it
  tokenizer_source: str | None = None           # where `tokenizer` comes from (default source)


def same_tokenizer(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  """Whether two tokenizer `identity()` dicts denote the same tokenizer (file name ignored)."""
  return all(a.get(k) == b.get(k) for k in TOKENIZER_KEYS)


def check_chunk_size(a: int, b: int, name_a: str, name_b: str) -> None:
  """Raises ManifestMismatchError if two chunk sizes differ, naming both."""
  if int(a) != int(b):
    raise fileio.ManifestMismatchError(
        f"chunk size mismatch: {name_a} has chunk_size={a} but {name_b} has chunk_size={b}")


def check_tokenizer(a: Mapping[str, Any], b: Mapping[str, Any], name_a: str,
                    name_b: str) -> None:
  """Raises ManifestMismatchError if two tokenizer identities differ (file name ignored)."""
  if not same_tokenizer(a, b):
    def short(t):
      return (f"{t.get('kind')} {t.get('file_name')} (sha256 {str(t.get('sha256'))[:12]}..., "
              f"vocab_size {t.get('vocab_size')})")
    raise fileio.ManifestMismatchError(
        f"tokenizer mismatch: {name_a} uses {short(a)} but {name_b} uses {short(b)}")


def check_embedder(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None, name_a: str,
                   name_b: str) -> None:
  """Refuses two embedder identities that differ on a field both record."""
  fileio.check_identity("embedder", a, b, name_a, name_b)


def check_vocab(vocab_size: int, tokenizer: Mapping[str, Any] | None, name_a: str,
                name_b: str) -> None:
  """Refuses a tokenizer (identity) whose ids would not fit a vocabulary of `vocab_size`."""
  have = (tokenizer or {}).get("vocab_size")
  if have is not None and int(have) > int(vocab_size):
    raise fileio.ManifestMismatchError(
        f"vocabulary size mismatch: {name_a} has vocab_size {vocab_size} but {name_b} uses a "
        f"tokenizer with vocab_size {have}")


def check(manifest: Mapping[str, Any], expected: Expected | None, name: str) -> None:
  """Refuses data (its manifest, named `name`) that was not made as `expected` says.

  Compared, each only when both sides record it: chunk size, tokenizer identity, that the
  tokenizer's ids fit the expected vocabulary, embedder identity.
  """
  if expected is None:
    return
  if expected.chunk_size is not None and manifest.get("chunk_size") is not None:
    check_chunk_size(expected.chunk_size, manifest["chunk_size"], expected.source, name)
  tok = manifest.get("tokenizer")
  if expected.tokenizer and tok:
    check_tokenizer(expected.tokenizer, tok, expected.tokenizer_source or expected.source,
                    name)
  if expected.vocab_size is not None:
    check_vocab(expected.vocab_size, tok, expected.source, name)
  if expected.embedder is not None:
    check_embedder(manifest.get("embedder"), expected.embedder, name, expected.source)


def check_compatible(manifest_a: Mapping[str, Any], manifest_b: Mapping[str, Any],
                     what: tuple[str, str] | str = ("first", "second")) -> None:
  """Checks that two manifests (chunk stores, or anything recording `tokenizer` and
  `chunk_size`) may be mixed: same tokenizer identity and same chunk size.

  Args:
    manifest_a, manifest_b: manifest dicts; a field missing from either is not compared.
    what: names of the two sides for the error message, e.g. ("database", "query set"),
      or one string "A vs B".
  Raises:
    ManifestMismatchError naming both values.
  """
  if isinstance(what, str):
    name_a, _, name_b = what.partition(" vs ")
    name_b = name_b or "the other"
  else:
    name_a, name_b = what
  if "chunk_size" in manifest_a and "chunk_size" in manifest_b:
    check_chunk_size(manifest_a["chunk_size"], manifest_b["chunk_size"], name_a, name_b)
  if manifest_a.get("tokenizer") and manifest_b.get("tokenizer"):
    check_tokenizer(manifest_a["tokenizer"], manifest_b["tokenizer"], name_a, name_b)
