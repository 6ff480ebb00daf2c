"""Every job's command line ends a bad flag value the same way: exit status 1 and one line,
`<prog>: error: <message>`, before any work (and before JAX is imported)."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (module, prog, arguments with one bad value, text the message must name)
CASES = [
    ("retro_jax.build_db", "build_db",
     ["--corpus=c", "--tokenizer=t", "--output=o", "--chunk_size=abc"], "--chunk_size"),
    ("retro_jax.build_db", "build_db",
     ["--corpus=c", "--tokenizer=t", "--output=o", "--index_mode=fast"], "--index_mode"),
    ("retro_jax.precompute_neighbors", "precompute_neighbors",
     ["--db=d", "--output=o", "--k=0"], "k must be >= 1"),
    ("retro_jax.precompute_neighbors", "precompute_neighbors",
     ["--db=d", "--output=o", "--exclude_same_document=maybe"], "--exclude_same_document"),
    ("retro_jax.evaluate", "evaluate", ["--workdir=w", "--corpus=c", "--ks=1,two"], "--ks"),
    ("retro_jax.generate", "generate", ["--workdir=w", "--prompt=p", "--top_p=2"], "top_p"),
    ("retro_jax.quickstart", "quickstart", ["--scale=big"], "--scale"),
    ("retro_jax.train_tokenizer", "train_tokenizer",
     ["--corpus=c", "--output=o", "--vocab_size=many"], "--vocab_size"),
    ("retro_jax.train_tokenizer", "train_tokenizer",
     ["--corpus=c", "--output=o", "--vocab_size=0"], "--vocab_size=0 is too small"),
    ("retro_jax.train_tokenizer", "train_tokenizer",
     ["--corpus=c", "--output=o", "--model_type=word"], "--model_type"),
    ("retro_jax.train_tokenizer", "train_tokenizer",
     ["--corpus=c", "--output=o", "--normalization=nfc"], "--normalization must be one of"),
    ("retro_jax.train_tokenizer", "train_tokenizer",
     ["--corpus=c", "--output=o", "--max_documents=-1"], "--max_documents"),
    ("retro_jax.show_neighbors", "show_neighbors", ["--db=d", "--k=many"], "--k"),
    ("retro_jax.show_neighbors", "show_neighbors", ["--db=d", "--chunk_id=0", "--k=0"],
     "--k must be >= 1"),
    ("retro_jax.show_neighbors", "show_neighbors", ["--db=d", "--chunk_id=0", "--text=t"],
     "exactly one of --chunk_id or --text"),
    ("retro_jax.show_neighbors", "show_neighbors", ["--db=d", "--chunk_id=-1"], "--chunk_id"),
    ("retro_jax.show_neighbors", "show_neighbors", ["--db=d", "--text=t", "--neighbors=n"],
     "give --chunk_id, not --text"),
    ("retro_jax.serve", "serve", ["--db=d", "--port=70000"], "--port"),
    ("retro_jax.serve", "serve", ["--db=d", "--shards=a=http://h:1",
                                             "--reload_interval=-1"], "--reload_interval"),
    ("retro_jax.serve", "serve", ["--db=d", "--shards=a"], "NAME=URL"),
    ("retro_jax.edit_db", "edit_db", ["shard", "--db=d", "--output=o", "--how=hardlink"],
     "--how"),
    ("retro_jax.edit_db", "edit_db", ["add", "--db=d"], "--corpus"),
    ("retro_jax.edit_db", "edit_db", ["drop", "--db=d"], "--doc_key=KEY"),
    ("retro_jax.edit_db", "edit_db", ["drop", "--db=d", "--doc_id=-2"], "--doc_id"),
    ("retro_jax.edit_db", "edit_db", ["shard", "--db=d"], "--output=DB"),
    ("retro_jax.edit_db", "edit_db", ["--db=d", "--corpus=c"], "give a command first"),
    ("retro_jax.edit_db", "edit_db", ["add", "--db=d", "--corpus=c", "--how=move"],
     "--how belongs to `edit_db shard`"),
    ("retro_jax.train", "train", ["--config=experiments/configs/tiny.py", "--workdir=w",
                                  "--config.seq_len=abc"], "--config.seq_len"),
    ("retro_jax.chunk_store", "chunk_store", ["--corpus=c", "--output=o"], "give --db=DB"),
    ("retro_jax.verify", "verify", ["a", "b"], "give one PATH"),
    ("retro_jax.import_lm", "import_lm", ["--source=s", "--output=o", "--num_neighbors=0"],
     "--num_neighbors must be >= 1"),
    ("retro_jax.export_lm", "export_lm", ["--workdir=w", "--output=o", "--step=-1"], "--step"),
    ("retro_jax.import_megatron", "import_megatron",
     ["--checkpoint=c", "--output=o", "--chunk_size=0"], "--chunk_size must be >= 1"),
    # ml_collections' own errors: a mistyped field, a missing config file.
    ("retro_jax.train", "train", ["--config=tiny", "--workdir=w",
                                  "--config.modle.chunk_size=64"], "--config.modle.chunk_size"),
    ("retro_jax.train", "train", ["--config=tiny", "--workdir=w",
                                  "--config.model.chunk_siz=64"], 'Did you mean "chunk_size"'),
    ("retro_jax.train", "train", ["--config=no/such/config.py", "--workdir=w"],
     "one of: quickstart"),
]


def _run(module, args, **env):
  return subprocess.run([sys.executable, "-m", module] + args, cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, **env), check=False)


@pytest.mark.parametrize("module, prog, args, names", CASES, ids=[c[0] for c in CASES])
def test_a_bad_flag_value_is_one_line_and_status_1(module, prog, args, names):
  proc = _run(module, args)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
  assert names in lines[0]


def test_packaged_configs_load_by_name_and_by_repository_path_from_any_directory(tmp_path):
  """Outside the repository, --config=small and --config=retro_jax/configs/small.py both
  find the installed file (the run then stops at the missing data, in one line)."""
  for value in ("small", "retro_jax/configs/small.py", "quickstart.py"):
    proc = subprocess.run([sys.executable, "-m", "retro_jax.train", f"--config={value}",
                           "--workdir=w"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "train: error: data.db_dir (or data.train_chunks_dir) must name the training data"]


def test_config_resolution(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # as outside the repository
  from retro_jax import configs  # pylint: disable=g-import-not-at-top
  packaged = os.path.join(configs.DIRECTORY, "small.py")
  assert configs.resolve("small") == packaged
  assert configs.resolve("retro_jax/configs/small.py:x") == packaged + ":x"
  own = os.path.join(ROOT, "experiments", "configs", "small.py")
  assert configs.resolve(own) == own  # an existing file is taken as given
  with pytest.raises(ValueError, match="one of: quickstart, quickstart_baseline"):
    configs.resolve("elsewhere/small.py")  # not a packaged path: never silently swapped
  assert configs.rewrite_argv(["p", "--config", "tiny", "--x=1"]) == [
      "p", "--config", os.path.join(configs.DIRECTORY, "tiny.py"), "--x=1"]
  # experiments/configs/ keeps working and gives the packaged config.
  import fixtures_data  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("_old_small", own)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config().to_dict() == fixtures_data.load_config("small").to_dict()


def test_a_misspelt_malloc_setting_gets_the_same_format():
  proc = _run("retro_jax.build_db", ["--corpus=c", "--tokenizer=t", "--output=o"],
              RETRO_JAX_MALLOC="sytem")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "build_db: error: RETRO_JAX_MALLOC='sytem': expected 'system' (glibc's malloc defaults) "
      "or 'tuned' (the default)"]


def test_train_reports_every_training_user_error():
  """train's own errors beyond ValueError/OSError (named for _cli.run) cover trainer's."""
  import ast  # pylint: disable=g-import-not-at-top
  from retro_jax.training import trainer  # pylint: disable=g-import-not-at-top
  tree = ast.parse(open(os.path.join(ROOT, "retro_jax", "train.py"), encoding="utf-8").read())
  names = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
               and ast.unparse(n.targets[0]) == "_ERRORS")
  for cls in trainer.USER_ERRORS:
    assert issubclass(cls, (ValueError, OSError)) or (
        f"{cls.__module__}.{cls.__name__}" in names), cls


# --- Flags derived from the configs -------------------------------------------------------

def _configs():
  # Imported here: the subprocess tests above must not pay for these imports.
  from retro_jax import quickstart_config  # pylint: disable=g-import-not-at-top
  from retro_jax.evaluation import eval_config  # pylint: disable=g-import-not-at-top
  from retro_jax.generation import generate_config  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import build_config  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import precompute_config  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import edit_config  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.db import show_config  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.serve import serve_config  # pylint: disable=g-import-not-at-top
  from retro_jax import verify_config  # pylint: disable=g-import-not-at-top
  from retro_jax.megatron import convert_config  # pylint: disable=g-import-not-at-top
  from retro_jax.pretrained import lm_config  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import chunk_store_config  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import tokenizer_config  # pylint: disable=g-import-not-at-top
  return [
      (build_config.BuildConfig, dict(corpus=("c",), tokenizer="t", output="o")),
      (precompute_config.PrecomputeConfig, dict(db="d", output="o")),
      (eval_config.EvalConfig, dict(workdir="w", corpus=("c",))),
      (generate_config.GenerateConfig, dict(workdir="w")),
      (quickstart_config.QuickstartConfig, {}),
      (tokenizer_config.TokenizerConfig, dict(corpus=("c",), output="o")),
      (show_config.ShowNeighborsConfig, dict(db="d", chunk_id=3)),
      (serve_config.ServeConfig, dict(db="d")),
      (chunk_store_config.ChunkStoreConfig, dict(corpus=("c",), output="o", db="d")),
      (lm_config.ImportLMConfig, dict(source="s", output="o")),
      (lm_config.ExportLMConfig, dict(workdir="w", output="o")),
      (convert_config.MegatronImportConfig, dict(checkpoint="c", output="o")),
      (verify_config.VerifyConfig, {}, dict(path="p")),  # PATH: the positional argument
      # The command word has no flag: the command passes it (`_CONFIG(command=...)`).
      (edit_config.EditConfig, dict(db="d", corpus=("c",)), dict(command="add")),
  ]


def _required_argv(required):
  argv = []
  for name, value in required.items():
    for v in (value if isinstance(value, tuple) else (value,)):
      argv.append(f"--{name}={v}")
  return argv


def _parse(cls, argv, aliases=None, **given):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from retro_jax import _cli  # pylint: disable=g-import-not-at-top
  values = flags.FlagValues()
  build = _cli.define_flags(cls, aliases=aliases, flag_values=values)
  values(["prog"] + argv)
  return build(**given)


@pytest.mark.parametrize("index", range(14))
def test_flag_defaults_are_the_config_defaults(index):
  """Every default is stated once: no flags but the required ones give the config's own
  defaults."""
  cls, required, *given = _configs()[index] + ({},)
  given = given[0]
  assert _parse(cls, _required_argv(required), **given) == cls(**required, **given)


def test_hand_written_flags_became_config_flags():
  """edit_db, show_neighbors and train_tokenizer keep their flags' names and kinds, and
  the flags fill the config's fields (--neighbors is the field neighbors_dir)."""
  from retro_jax.retrieval.db import show_config  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import edit_config  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import tokenizer_config  # pylint: disable=g-import-not-at-top
  e = _parse(edit_config.EditConfig, ["--db=D", "--doc_key=a.txt", "--doc_key=b.txt",
                                      "--doc_id=3,17"], command="drop")
  assert (e.doc_key, e.doc_id) == (("a.txt", "b.txt"), (3, 17))
  s = _parse(show_config.ShowNeighborsConfig, ["--db=D", "--chunk_id=5", "--neighbors=NB",
                                               "--noexclude_same_document", "--width=0"])
  assert (s.chunk_id, s.neighbors_dir, s.exclude_same_document, s.width) == (5, "NB", False, 0)
  t = _parse(tokenizer_config.TokenizerConfig, ["--corpus=a,b", "--output=o",
                                                "--model_type=bpe", "--via_file"])
  assert (t.corpus, t.model_type, t.via_file) == (("a", "b"), "bpe", True)


def test_flags_reach_nested_fields_and_the_old_name_is_an_alias():
  from retro_jax.evaluation import eval_config  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import build_config  # pylint: disable=g-import-not-at-top
  ev = _parse(eval_config.EvalConfig, ["--workdir=w", "--corpus=a", "--corpus=b",
                                       "--db_dir=D", "--ks=1,3", "--retrieval=off",
                                       "--noprogress"], aliases={"db_dir": "db"})
  assert ev.db == "D" and ev.corpus == ("a", "b") and ev.source == ["a", "b"]
  assert ev.settings.ks == (1, 3) and not ev.settings.retrieval_on
  assert ev.settings.retrieval_off and not ev.settings.progress
  b = _parse(build_config.BuildConfig, ["--corpus=c", "--tokenizer=t", "--output=o",
                                        "--index_mode=tree_ah", "--nospherical_tree",
                                        "--reorder=50"])
  assert (b.index.mode, b.index.spherical, b.index.reorder) == ("tree_ah", False, 50)


def test_orbax_info_is_quiet_by_default_and_its_warnings_pass():
  import logging  # pylint: disable=g-import-not-at-top
  from retro_jax import _cli  # pylint: disable=g-import-not-at-top
  quiet = _cli.QuietLibraryInfo()
  rec = lambda level, path: logging.LogRecord("absl", level, path, 1, "m", (), None)
  orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
  assert not quiet.filter(rec(logging.INFO, orbax_file))
  assert quiet.filter(rec(logging.WARNING, orbax_file))
  assert quiet.filter(rec(logging.INFO, os.path.join("retro_jax", "training", "trainer.py")))
  logger = logging.getLogger("absl")
  _cli.quiet_orbax(True)
  _cli.quiet_orbax(True)  # installed once
  assert sum(isinstance(f, _cli.QuietLibraryInfo) for f in logger.filters) == 1
  _cli.quiet_orbax(False)  # --orbax_logs
  assert not any(isinstance(f, _cli.QuietLibraryInfo) for f in logger.filters)
