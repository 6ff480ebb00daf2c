"""The memory a 16 MiB JSON bomb costs a service before its 413 (#36).

  PYTHONPATH=$PWD python experiments/benchmarks/bench_json_bomb.py runs/quickstart/db PORT
"""
import json, subprocess, sys, threading, time, urllib.request, urllib.error
db, port = sys.argv[1], int(sys.argv[2])
proc = subprocess.Popen([sys.executable, "-m", "retro_jax.serve", f"--db={db}", f"--port={port}", "--skip_content_check"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
assert "retrieval service on" in proc.stdout.readline()
url = f"http://127.0.0.1:{port}"
def rss():
  with open(f"/proc/{proc.pid}/status") as f:
    for l in f:
      if l.startswith("VmRSS"): return int(l.split()[1]) / 1024
time.sleep(1); idle = rss(); peak = [idle]; stop = threading.Event()
def sample():
  while not stop.is_set(): peak.append(rss()); time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
bomb = b"[" + b"0," * ((16 << 20) // 2 - 8) + b"0]"
t = time.perf_counter()
try:
  urllib.request.urlopen(urllib.request.Request(url + "/retrieve", data=bomb), timeout=300).read(); st = 200
except urllib.error.HTTPError as e:
  st = e.code
dt = time.perf_counter() - t
time.sleep(1); stop.set()
print(json.dumps({"bomb_bytes": len(bomb), "status": st, "seconds": round(dt, 2), "peak_above_idle_mb": round(max(peak) - idle)}))
proc.terminate(); proc.wait()
