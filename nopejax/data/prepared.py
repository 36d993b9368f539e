"""A corpus prepared into data.tfds_dir (sources.py): one process prepares it while others started at
the same time wait and then reuse it; the fingerprint of the text files it came from; its shards
still there when read."""
import contextlib
import hashlib
import json
import os
import socket
import time

from absl import logging
from etils import epath

from nopejax import config, paths

POLL_SECONDS = 0.5
_CHUNK = 1 << 20


@contextlib.contextmanager
def one_at_a_time(data_dir):
  """Holds `data_dir`.preparing, created with O_EXCL, while the caller prepares `data_dir`.

  tfds writes each preparation into its own temporary directory and renames it into place, so of
  two processes preparing one data.tfds_dir at once the second to finish would crash on the rename.
  Here the second waits for the first, and then finds the directory prepared. The lock of a process
  that died on this host is taken over; one held on another host (a shared file system) is waited
  for. On object stores (gs://), which have no exclusive create, nothing is locked: the copy is
  staged locally and uploaded whole, and the last upload wins.
  """
  if paths.is_url(data_dir):
    yield
    return
  lock = f'{os.fspath(data_dir)}.preparing'
  os.makedirs(os.path.dirname(lock), exist_ok=True)
  next_note = time.monotonic()
  while True:
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      holder = _holder(lock)
      if holder and holder[0] == socket.gethostname() and not _alive(holder[1]):
        with contextlib.suppress(FileNotFoundError):
          os.remove(lock)  # Its process died while preparing; its temporary directory is tfds's to ignore.
        continue
      if time.monotonic() >= next_note:
        logging.info('Waiting for %s: process %s prepares %s (delete the lock if it is gone).', lock, holder, data_dir)
        next_note += 60
      time.sleep(POLL_SECONDS)
  try:
    os.write(fd, f'{socket.gethostname()} {os.getpid()}'.encode())
    os.close(fd)
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(lock)


def _holder(lock):
  """(host, pid) written in the lock; None while its creator has not written them yet."""
  try:
    host, pid = open(lock).read().split()
    return host, int(pid)
  except (OSError, ValueError):
    return None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # Signal 0 sends nothing: it only asks whether the process exists.
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


def _file_state(path: epath.Path) -> list:
  """[size, modification time in ns] of a local file or URL."""
  if paths.is_url(path):
    stat = path.stat()
    return [stat.length, int(stat.mtime * 1e9)]
  stat = os.stat(path)
  return [stat.st_size, stat.st_mtime_ns]


def _content_hash(path: epath.Path) -> str:
  digest = hashlib.blake2b(digest_size=16)
  with path.open('rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def fingerprint(root: epath.Path, files, then=None) -> dict:
  """{name: [size, mtime_ns, blake2b of the bytes]} of the corpus files under `root`.

  A file whose size and mtime match `then` (an earlier fingerprint) keeps its recorded hash
  unread; any other file is read whole. So preparing costs one more read of the corpus (blake2b
  hashes about 1 GB/s on one core), and each later start one stat per file plus a read of the files
  whose mtime moved: an edit in place that keeps the size is caught, a touch without one is not a
  change.
  """
  then = then or {}
  now = {}
  for path in files:
    name = path.relative_to(root).as_posix()
    state = _file_state(path)
    recorded = then.get(name, [])
    now[name] = recorded if recorded[:2] == state and len(recorded) == 3 else [*state, _content_hash(path)]
  return now


def changed_files(then: dict, now: dict) -> list[str]:
  """Names of the files added, removed, or whose size or bytes differ between two fingerprints."""
  def same(old, new):
    return old[0] == new[0] and (len(old) < 3 or old[2] == new[2])  # [size] alone: an older record.
  return sorted(name for name in then.keys() | now.keys()
                if name not in then or name not in now or not same(then[name], now[name]))


def read_record(path: epath.Path) -> dict | None:
  """A fingerprint written by write_record; older records listed [name, size] pairs."""
  if not path.exists():
    return None
  record = json.loads(path.read_text())
  return {entry[0]: entry[1:] for entry in record} if isinstance(record, list) else record


def write_record(path: epath.Path, now: dict) -> None:
  path.write_text(json.dumps(now, sort_keys=True))


def check_shards(builder, split: str) -> None:
  """Every shard file of a prepared split is still there, before a reader fails on it mid-run."""
  for shard in builder.info.splits[split].filepaths:
    if not epath.Path(shard).exists():
      raise config.ConfigError(
          f'The prepared shard {shard} is missing (deleted or moved since {builder.data_dir} was prepared); '
          f'delete {builder.data_dir} to prepare it again.')
