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
from nopejax.checkpoint import disk
from nopejax.config import ConfigError


def boot_id() -> str | None:
  """This machine's boot (Linux): a lock written before a reboot names a pid of another boot."""
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return None


def process_start(pid: int) -> int | None:
  """When process `pid` started, in clock ticks since boot (Linux /proc/PID/stat, field 22), so a
  pid used again by another process (after a container restart, say) is told from the holder."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
    return int(stat[stat.rindex(')') + 2:].split()[19])  # Fields after the command name start at 3.
  except (OSError, ValueError, IndexError):
    return None


class WorkdirLock:
  """WORKDIR/lock.json names the run that holds the workdir (host, pid, start) and is refreshed
  every HEARTBEAT seconds. A second run refuses while the holder lives; the lock of a dead run is
  taken over (same host: its pid is gone, or belongs to a process that started at another time or
  in another boot; another host: not refreshed for STALE seconds). Process 0 of a job holds it for
  all of the job's processes. A workdir the lock created is removed again if the run leaves it
  empty (an error before anything was written).

  The lock spans every write of the run, so it also checks the workdir is writable before the
  run starts, and turns a write the disk refuses later (full, read-only) into one sentence."""

  HEARTBEAT, STALE = 60, 300

  def __init__(self, workdir):
    self.workdir = paths.resolve(workdir)
    self.path = self.workdir / 'lock.json'
    self.holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'token': uuid.uuid4().hex,
                   'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'boot_id': boot_id(),
                   'process_start': process_start(os.getpid())}
    self.stopped = threading.Event()

  def _read(self):
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):  # Gone, or cut short by a kill: nobody holds it.
      return None

  def _alive(self, holder) -> bool:
    if holder['host'] == self.holder['host']:
      if None not in (holder.get('boot_id'), self.holder['boot_id']) and holder['boot_id'] != self.holder['boot_id']:
        return False  # Written before this machine (or container host) rebooted.
      recorded, current = holder.get('process_start'), process_start(holder['pid'])
      if None not in (recorded, current) and recorded != current:
        return False  # Its pid now names another process.
      try:
        os.kill(holder['pid'], 0)
      except ProcessLookupError:
        return False
      except PermissionError:
        pass
      return holder['pid'] != self.holder['pid']
    return time.time() - holder['heartbeat'] < self.STALE

  def _write(self):
    try:
      paths.write_text(self.path, json.dumps(dict(self.holder, heartbeat=time.time())))
    except OSError as e:
      code = disk.refused(e)
      raise ConfigError(disk.sentence(self.workdir, code) if code else (
          f'Cannot write {self.path} ({type(e).__name__}: {e}); pass a --workdir this user can write to.')) from None

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
    disk.check_writable(self.workdir)
    self.created = not self.workdir.exists()
    refusal = None
    if jax.process_index() == 0:
      try:
        refusal = self._refusal()
        if refusal is None:
          self._write()
          time.sleep(0.1)  # Two starts at once: the later write wins, the other one sees it and refuses.
          refusal = self._refusal()
      except ConfigError as e:  # Told to every process below, rather than leaving them waiting.
        refusal = str(e)
    if jax.process_count() > 1:
      refused = int(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
      refusal = refusal or (f'{self.workdir} is in use by another run or cannot be written (process 0 says which); '
                            'stop that run or use another --workdir.' if refused else None)
    if refusal:
      raise ConfigError(refusal)
    if jax.process_index() == 0:
      self.heartbeat = threading.Thread(target=self._beat, daemon=True)
      self.heartbeat.start()
    self.echoes = disk.echoes_of_refused_writes_dropped()
    self.echoes.__enter__()
    return self

  def _beat(self):
    while not self.stopped.wait(self.HEARTBEAT):
      try:
        self._write()
      except ConfigError as e:  # A full disk, say: the run's own next write stops it with the same sentence.
        logging.warning('%s', e)

  def __exit__(self, exc_type, exc, traceback):
    self.echoes.__exit__(None, None, None)
    self._release()
    code = disk.refused(exc)
    if code:
      raise ConfigError(disk.sentence(
          self.workdir, code, then=', so the run stopped (it resumes from its last checkpoint)')) from None

  def _release(self):
    if jax.process_index() != 0:
      return
    self.stopped.set()
    self.heartbeat.join()
    holder = self._read()
    if holder and holder['token'] == self.holder['token']:
      try:
        self.path.unlink()
      except OSError as e:  # A read-only remount, say: the next run on this host sees this pid gone.
        logging.warning('Cannot remove %s (%s).', self.path, e)
    if self.created and self.workdir.is_dir() and not any(self.workdir.iterdir()):
      self.workdir.rmdir()
