"""The service's batcher: queued queries of several requests run as one shared call."""

from __future__ import annotations

import collections
import concurrent.futures
import threading

from retro_jax.retrieval.serve import handler as handler_lib


class Batcher:
  """One thread that runs the prepared queries waiting, together (`RetrievalHandler.run`)."""

  def __init__(self, handler: handler_lib.RetrievalHandler, batch_rows: int, max_queued_rows: int):
    self.handler = handler
    self.batch_rows = batch_rows
    self.max_queued_rows = max_queued_rows
    self._cv = threading.Condition()
    self._queue: collections.deque = collections.deque()
    self._queued_rows = 0
    self._stopped = False
    self.batches = 0  # Shared calls run so far (tests and benchmarks read it).
    self.lock = threading.Lock()  # Held while the index (and BERT) run.
    self._thread = threading.Thread(target=self._loop, name="retrieval-batcher", daemon=True)
    self._thread.start()

  def submit(self, query: handler_lib.Query) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    with self._cv:
      if self._queue and self._queued_rows + query.n > self.max_queued_rows:
        raise handler_lib.BadRequest(503, f"{self._queued_rows} queries are waiting (limit "
                                     f"{self.max_queued_rows}); retry later")
      self._queue.append((query, future))
      self._queued_rows += query.n
      self._cv.notify()
    return future

  def _take(self) -> list:
    with self._cv:
      while not self._queue and not self._stopped:
        self._cv.wait()
      batch, rows = [], 0
      while self._queue and (not batch or rows + self._queue[0][0].n <= self.batch_rows):
        query, future = self._queue.popleft()
        self._queued_rows -= query.n
        rows += query.n
        if future.set_running_or_notify_cancel():
          batch.append((query, future))
      return batch

  def _loop(self) -> None:
    while True:
      batch = self._take()
      if not batch:
        if self._stopped:
          return
        continue
      try:
        with self.lock:
          results = self.handler.run([q for q, _ in batch])
      except Exception as e:  # pylint: disable=broad-except  (answered as 500s)
        for _, future in batch:
          future.set_exception(e)
        continue
      self.batches += 1
      for (_, future), result in zip(batch, results):
        future.set_result(result)

  def stop(self) -> None:
    with self._cv:
      self._stopped = True
      for _, future in self._queue:
        future.cancel()
      self._queue.clear()
      self._cv.notify_all()
    self._thread.join(timeout=5)
