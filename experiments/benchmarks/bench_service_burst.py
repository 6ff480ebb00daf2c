"""A 1-chunk query beside four 16 MB texts (#36): its latency, the service's memory.

  PYTHONPATH=$PWD python experiments/benchmarks/bench_service_burst.py runs/quickstart/db PORT [serve flags]

Starts `python -m retro_jax.serve` on DB, posts four 16 MB texts at once, then a 1-chunk
query; prints the query's status and latency, the peak RSS above idle and the RSS after.
"""
import json, os, random, subprocess, sys, threading, time, urllib.request, urllib.error
db, port = sys.argv[1], int(sys.argv[2])
extra = sys.argv[3:]
proc = subprocess.Popen([sys.executable, "-m", "retro_jax.serve", f"--db={db}", f"--port={port}",
                         "--skip_content_check"] + extra, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
line = proc.stdout.readline()
assert "retrieval service on" in line, line
url = f"http://127.0.0.1:{port}"
def rss():  # MB (the served process is the re-exec'd python: same pid)
  with open(f"/proc/{proc.pid}/status") as f:
    for l in f:
      if l.startswith("VmRSS"): return int(l.split()[1]) / 1024
m = json.loads(urllib.request.urlopen(url + "/manifest").read())["chunk_size"]
def post(body, timeout=300):
  t = time.perf_counter()
  req = urllib.request.Request(url + "/retrieve", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
  try:
    urllib.request.urlopen(req, timeout=timeout).read(); status = 200
  except urllib.error.HTTPError as e:
    status = e.code
  return status, time.perf_counter() - t
small = {"chunks": [[5] * m], "k": 2}
for _ in range(3): post(small)  # warm
time.sleep(1)
idle = rss()
words = ["alpha", "beta", "gamma", "delta", "model", "retrieval", "chunk", "token", "neighbor", "layer"]
rng = random.Random(0)
text = " ".join(rng.choice(words) for _ in range(16 * 2**20 // 7))[:16 * 2**20]
body = json.dumps({"texts": [text], "k": 2}).encode()
peak, stop = [idle], threading.Event()
def sample():
  while not stop.is_set():
    peak.append(rss()); time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
results = []
def big():
  t = time.perf_counter()
  req = urllib.request.Request(url + "/retrieve", data=body, headers={"Content-Type": "application/json"})
  try:
    urllib.request.urlopen(req, timeout=600).read(); s = 200
  except urllib.error.HTTPError as e:
    s = e.code
  except OSError:  # answered 503 and closed while the body was still being sent
    s = "503/closed"
  results.append((s, round(time.perf_counter() - t, 2)))
threads = [threading.Thread(target=big) for _ in range(4)]
for th in threads: th.start()
time.sleep(1.0)
q_status, q_latency = post(small)
for th in threads: th.join()
stop.set(); time.sleep(2)
after = rss()
print(json.dumps({"idle_rss_mb": round(idle), "peak_above_idle_mb": round(max(peak) - idle),
                  "after_burst_above_idle_mb": round(after - idle), "small_query": [q_status, round(q_latency, 3)],
                  "big_texts": results}))
proc.terminate(); proc.wait()
