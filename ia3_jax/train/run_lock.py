"""One training run per MODEL_DIR: a lock file naming its owner (host, pid, start time).

Two runs writing one MODEL_DIR would replace each other's checkpoints and results without
either noticing, so `train` holds `<MODEL_DIR>/.ia3_jax.lock` for as long as it runs and a
second run is refused at once with one line naming the holder. On one host the lock is an
`flock`, which the kernel drops when its process dies, however it dies (kill -9 included):
a stale lock never blocks. A lock written by another host (a shared file system, where
`flock` may not reach across hosts) counts as held while its owner refreshes it, every
`HEARTBEAT_S` seconds; after `STALE_S` seconds without a refresh it is stale and taken over
(a preempted VM's run resumes on a new one). Remote paths (`gs://...`) are not locked.
In a multi-process run process 0 alone holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Iterator, Optional

from ia3_jax.errors import ConfigError

LOCK_NAME = ".ia3_jax.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunLock:
  """The held lock of one MODEL_DIR (see the module docstring); `release` is idempotent."""

  def __init__(self, model_dir: str, fd: int, path: str):
    self.model_dir, self._fd, self.path = model_dir, fd, path
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._heartbeat, name="ia3_jax-run-lock",
                                    daemon=True)
    self._thread.start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def release(self) -> None:
    """Removes the lock file, then drops the lock (a waiting run re-checks the file)."""
    if self._fd < 0:
      return
    self._stop.set()
    with contextlib.suppress(OSError):
      os.unlink(self.path)
    os.close(self._fd)
    self._fd = -1


def _holder(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  try:
    return json.loads(os.read(fd, 4096).decode() or "{}")
  except (ValueError, UnicodeDecodeError):
    return {}


def _describe(holder: dict) -> str:
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
  return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {since}"


def acquire(model_dir: str) -> Optional[RunLock]:
  """Takes MODEL_DIR's lock, or raises `ConfigError` naming the run that holds it."""
  if "://" in model_dir:
    return None
  path = os.path.join(model_dir, LOCK_NAME)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _holder(fd)
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
        raise
      raise ConfigError(f"MODEL_DIR={model_dir!r} is in use by another training run "
                        f"({_describe(holder)}); wait for it to end or set --gin.MODEL_DIR "
                        "to another directory") from None
    try:  # the file may have been released (removed) between our open and our lock
      if os.fstat(fd).st_ino != os.stat(path).st_ino:
        os.close(fd)
        continue
    except FileNotFoundError:
      os.close(fd)
      continue
    break
  holder, host = _holder(fd), socket.gethostname()
  age = time.time() - os.fstat(fd).st_mtime
  if holder.get("host") not in (None, host) and age < STALE_S:
    os.close(fd)
    raise ConfigError(f"MODEL_DIR={model_dir!r} is in use by another training run "
                      f"({_describe(holder)}, last seen {age:.0f} s ago); wait for it to end, "
                      f"or remove {path} if that run is gone (taken over by itself after "
                      f"{STALE_S:.0f} s)")
  record = json.dumps({"host": host, "pid": os.getpid(), "started": time.time()}).encode()
  os.ftruncate(fd, 0)
  os.pwrite(fd, record, 0)
  return RunLock(model_dir, fd, path)


@contextlib.contextmanager
def hold(model_dir: str, enabled: bool = True) -> Iterator[Optional[RunLock]]:
  """`acquire` for the body of a `with`; released at its end, however it ends."""
  lock = acquire(model_dir) if enabled else None
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
