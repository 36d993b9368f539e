"""The workdir lock: one run at a time writes a workdir, and the lock of a run that died is taken over."""
import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from nopejax import paths
from nopejax.config import ConfigError


class WorkdirLock:
  """WORKDIR/lock.json names the run that holds the workdir (host, pid, start) and is refreshed
  every HEARTBEAT seconds. A second run refuses while the holder lives; the lock of a dead run is
  taken over (same host: its pid is gone; another host: not refreshed for STALE seconds). Process 0
  of a job holds it for all of the job's processes. A workdir the lock created is removed again if
  the run leaves it empty (an error before anything was written)."""

  HEARTBEAT, STALE = 60, 300

  def __init__(self, workdir):
    self.workdir = paths.resolve(workdir)
    self.path = self.workdir / 'lock.json'
    self.holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'token': uuid.uuid4().hex,
                   'started': time.strftime('%Y-%m-%d %H:%M:%S')}
    self.stopped = threading.Event()

  def _read(self):
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):  # Gone, or cut short by a kill: nobody holds it.
      return None

  def _alive(self, holder) -> bool:
    if holder['host'] == self.holder['host']:
      try:
        os.kill(holder['pid'], 0)
      except ProcessLookupError:
        return False
      except PermissionError:
        pass
      return holder['pid'] != self.holder['pid']
    return time.time() - holder['heartbeat'] < self.STALE

  def _write(self):
    paths.write_text(self.path, json.dumps(dict(self.holder, heartbeat=time.time())))

  def _refusal(self):
    holder = self._read()
    if holder and holder['token'] != self.holder['token'] and self._alive(holder):
      return (f'{self.workdir} is in use by the run of pid {holder["pid"]} on {holder["host"]} (started '
              f'{holder["started"]}); stop that run or use another --workdir (delete {self.path} only if that '
              'run is gone).')
    if holder and holder['token'] != self.holder['token']:
      logging.warning('Taking over %s from pid %s on %s, which is gone.', self.path, holder['pid'], holder['host'])
    return None

  def __enter__(self):
    self.created = not self.workdir.exists()
    refusal = None
    if jax.process_index() == 0:
      refusal = self._refusal()
      if refusal is None:
        self._write()
        time.sleep(0.1)  # Two starts at once: the later write wins, the other one sees it and refuses.
        refusal = self._refusal()
    if jax.process_count() > 1:
      refused = int(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
      refusal = refusal or (f'{self.workdir} is in use by another run; stop it or use another --workdir.' if refused else None)
    if refusal:
      raise ConfigError(refusal)
    if jax.process_index() == 0:
      self.heartbeat = threading.Thread(target=self._beat, daemon=True)
      self.heartbeat.start()
    return self

  def _beat(self):
    while not self.stopped.wait(self.HEARTBEAT):
      self._write()

  def __exit__(self, *exc):
    if jax.process_index() != 0:
      return
    self.stopped.set()
    self.heartbeat.join()
    holder = self._read()
    if holder and holder['token'] == self.holder['token']:
      self.path.unlink()
    if self.created and self.workdir.is_dir() and not any(self.workdir.iterdir()):
      self.workdir.rmdir()
