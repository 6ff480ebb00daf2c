"""The quickstart pipeline's own logic: deterministic split, budgets, bad input."""

import json
import os

import pytest

from retro_jax import pipeline


def write_files(root, n=40):
  os.makedirs(os.path.join(root, "pkg", "__pycache__"))
  os.makedirs(os.path.join(root, "site-packages"))
  for i in range(n):
    with open(os.path.join(root, "pkg", f"m{i}.py"), "w") as f:
      f.write(f"def f{i}():\n    return {i}\n")
  open(os.path.join(root, "pkg", "__pycache__", "x.py"), "w").write("cached = 1\n")
  open(os.path.join(root, "site-packages", "dep.py"), "w").write("dep = 1\n")
  open(os.path.join(root, "pkg", "empty.py"), "w").write("  \n")
  open(os.path.join(root, "pkg", "latin1.py"), "wb").write(b"s = '\xe9'\n")


def read_ids(path):
  return [json.loads(line)["id"] for line in open(path)]


def test_split_is_deterministic_disjoint_and_skips_bad_files(tmp_path):
  root = str(tmp_path / "src")
  write_files(root)
  a = pipeline.split_corpus(root, str(tmp_path / "a"), eval_percent=25)
  b = pipeline.split_corpus(root, str(tmp_path / "b"), eval_percent=25)
  train, held = read_ids(a.train_jsonl), read_ids(a.eval_jsonl)
  assert train == read_ids(b.train_jsonl) and held == read_ids(b.eval_jsonl)
  assert not set(train) & set(held)
  assert len(train) + len(held) == 40  # empty, non-UTF-8, caches, site-packages left out
  assert all(i.startswith("pkg/m") for i in train + held)


def test_byte_budget_is_respected(tmp_path):
  root = str(tmp_path / "src")
  write_files(root)
  s = pipeline.split_corpus(root, str(tmp_path / "out"), eval_percent=25,
                            max_train_bytes=100)
  assert 0 < s.train_bytes <= 100
  assert s.train_bytes == sum(len(json.loads(l)["text"].encode()) for l in open(s.train_jsonl))


def test_bad_inputs_name_the_problem(tmp_path):
  with pytest.raises(pipeline.PipelineError, match="is not a directory"):
    pipeline.split_corpus(str(tmp_path / "missing"), str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(pipeline.PipelineError, match="no .py files"):
    pipeline.split_corpus(str(tmp_path / "empty"), str(tmp_path / "out"))
  root = str(tmp_path / "src")
  write_files(root, n=3)
  with pytest.raises(pipeline.PipelineError, match="empty train or eval set"):
    pipeline.split_corpus(root, str(tmp_path / "out2"), eval_percent=0)
  with pytest.raises(pipeline.PipelineError, match="--scale must be positive"):
    pipeline.run_quickstart(workdir=str(tmp_path / "w"), scale=0, corpus_root=root, steps=1,
                            train_bytes=1, eval_bytes=1, preset="quickstart", vocab_size=4096,
                            seq_len=64, batch_size=1, learning_rate=1e-3, eval_k=[1])
  with pytest.raises(pipeline.PipelineError, match="has no retrieval"):
    pipeline.run_quickstart(workdir=str(tmp_path / "w"), scale=1, corpus_root=root, steps=1,
                            train_bytes=1, eval_bytes=1, preset="quickstart-baseline",
                            vocab_size=4096, seq_len=64, batch_size=1, learning_rate=1e-3,
                            eval_k=[1])


def test_quickstart_cli_reports_bad_corpus_without_traceback(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "retro_jax.quickstart",
                         f"--workdir={tmp_path / 'w'}", f"--corpus_root={tmp_path / 'nope'}"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "is not a directory" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_directory_split_keeps_each_directory_on_one_side_and_globs_select_files(tmp_path):
  root = tmp_path / "models"
  for d in range(30):
    (root / f"model{d}").mkdir(parents=True)
    for name in ("modeling_x.py", "configuration_x.py"):
      (root / f"model{d}" / name).write_text(f"# {name} of model {d}\nx = {d}\n")
  s = pipeline.split_corpus(str(root), str(tmp_path / "out"), suffixes=("modeling_*.py",),
                            eval_percent=30, split_by="directory")
  train, held = read_ids(s.train_jsonl), read_ids(s.eval_jsonl)
  assert all(i.endswith("modeling_x.py") for i in train + held)
  assert len(train) + len(held) == 30 and held
  assert not {i.split("/")[0] for i in train} & {i.split("/")[0] for i in held}
  with pytest.raises(pipeline.PipelineError, match="split_by"):
    pipeline.split_corpus(str(root), str(tmp_path / "o2"), split_by="model")


def test_twin_eval_puts_a_copy_of_each_held_out_document_in_the_training_split(tmp_path):
  root = str(tmp_path / "src")
  write_files(root)
  s = pipeline.split_corpus(root, str(tmp_path / "out"), eval_percent=25, twin_eval=True)
  train = {json.loads(l)["id"]: json.loads(l)["text"] for l in open(s.train_jsonl)}
  held = {json.loads(l)["id"]: json.loads(l)["text"] for l in open(s.eval_jsonl)}
  assert held and all(train["twin/" + k] == v for k, v in held.items())
  plain = pipeline.split_corpus(root, str(tmp_path / "out2"), eval_percent=25)
  assert set(read_ids(plain.train_jsonl)) == {k for k in train if not k.startswith("twin/")}


def test_the_embedded_corpora_exist_on_this_install():
  for name, (root_fn, suffixes, _) in pipeline.CORPORA.items():
    assert pipeline.list_files(root_fn(), suffixes), name


@pytest.mark.parametrize("flag, message", [("--bert=hashing:many", "hashing:D"),
                                           ("--corpus=wikipedia", "--corpus"),
                                           ("--split_by=model", "--split_by")])
def test_quickstart_cli_names_a_bad_flag_in_one_line(tmp_path, flag, message):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "retro_jax.quickstart",
                         f"--workdir={tmp_path / 'w'}", flag],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and message in proc.stderr
  assert "Traceback" not in proc.stderr


def test_a_rerun_with_other_data_settings_is_refused_not_mixed(tmp_path):
  work = str(tmp_path / "w")
  os.makedirs(work)
  settings = dict(corpus_root="/a", bert="hashing:4096", vocab_size=4096)
  pipeline.check_workdir_data(work, settings)
  pipeline.check_workdir_data(work, dict(settings))  # same settings: resumes
  with pytest.raises(pipeline.PipelineError, match=r"bert: 'hashing:4096' -> None"):
    pipeline.check_workdir_data(work, dict(settings, bert=None))


def test_the_held_out_set_names_the_transformers_version_it_came_from(tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  from retro_jax import quickstart_config  # pylint: disable=g-import-not-at-top
  version = pipeline.corpus_version(quickstart_config.QuickstartConfig())
  assert version == f"transformers {transformers.__version__} (modeling_*.py)"
  # A workdir from before versions were recorded resumes, and records this one.
  work = str(tmp_path / "w")
  os.makedirs(work)
  settings = dict(corpus_root="/a", bert=None)
  pipeline.check_workdir_data(work, settings)
  pipeline.check_workdir_data(work, dict(settings, corpus_version=version))
  with pytest.raises(pipeline.PipelineError, match="corpus_version"):
    pipeline.check_workdir_data(work, dict(settings, corpus_version="transformers 0.0"))
