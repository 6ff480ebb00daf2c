"""Renders Debian's man3 pages (not Perl's 3pm) to text, one file each, dropping .so
aliases (the same page under another name), then splits by file: ~8% held out."""
import gzip, hashlib, os, subprocess, sys
src = "/usr/share/man/man3"
out_train, out_held = "corpus/train", "corpus/heldout"
os.makedirs(out_train, exist_ok=True); os.makedirs(out_held, exist_ok=True)
names = sorted(n for n in os.listdir(src) if n.endswith(".gz") and "3pm" not in n and "3perl" not in n)
seen = set(); kept = 0; train_bytes = held_bytes = 0
for n in names:
  raw = gzip.open(os.path.join(src, n)).read()
  if raw.lstrip().startswith(b".so "):
    continue
  text = subprocess.run(["man", "-l", "-P", "cat", os.path.join(src, n)], capture_output=True,
                        env=dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0")).stdout
  text = subprocess.run(["col", "-b"], input=text, capture_output=True).stdout.decode("utf-8", "replace")
  if "3perl" in text.splitlines()[0] if text else True:
    continue
  h = hashlib.sha1(text.encode()).hexdigest()
  if h in seen or len(text) < 200:
    continue
  seen.add(h)
  held = int(hashlib.sha1(n.encode()).hexdigest()[:8], 16) % 100 < 8
  d = out_held if held else out_train
  with open(os.path.join(d, n[:-3] + ".txt"), "w") as f:
    f.write(text)
  if held: held_bytes += len(text.encode())
  else: train_bytes += len(text.encode())
  kept += 1
print(f"{kept} pages; train {train_bytes} bytes, held out {held_bytes} bytes")
