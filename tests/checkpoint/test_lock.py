"""WorkdirLock: one run at a time in a workdir; the lock of a dead run (gone, its pid reused, from
before a reboot, or silent on another host) is taken over."""
import json
import os
import shutil
import socket
import time

import pytest

from nopejax import checkpoint, loop
from nopejax.checkpoint import lock
from nopejax.config import ConfigError
from conftest import tree_digest


def write_lock(directory, **holder):
  (directory / 'lock.json').write_text(json.dumps(dict({'token': 'old', 'started': 'then', 'heartbeat': 0}, **holder)))


def test_a_second_run_on_a_live_runs_workdir_is_refused(small_run, tmp_path):
  cfg, full_dir = small_run
  workdir = str(tmp_path / 'copy')
  shutil.copytree(full_dir, workdir)
  holder = {'host': socket.gethostname(), 'pid': os.getppid(), 'token': 'other', 'started': '2026-11-23 10:00:00',
            'heartbeat': 0}
  with open(os.path.join(workdir, 'lock.json'), 'w') as f:
    json.dump(holder, f)
  before = tree_digest(workdir)
  with pytest.raises(ConfigError, match=rf'copy is in use by the run of pid {os.getppid()} on {socket.gethostname()} '
                     r'\(started 2026-11-23 10:00:00\); stop that run or use another --workdir'):
    loop.run(cfg.copy_and_resolve_references(), workdir)
  assert tree_digest(workdir) == before


def test_the_lock_of_a_dead_run_is_taken_over(tmp_path):
  for holder in ({'host': socket.gethostname(), 'pid': 2 ** 22 + 7, 'heartbeat': 0},  # No such process here.
                 {'host': 'elsewhere', 'pid': 1, 'heartbeat': time.time() - 600}):  # Silent for 10 minutes.
    write_lock(tmp_path, **holder)
    with checkpoint.WorkdirLock(str(tmp_path)):
      assert json.loads((tmp_path / 'lock.json').read_text())['pid'] == os.getpid()
    assert not (tmp_path / 'lock.json').exists()
  write_lock(tmp_path, host='elsewhere', pid=1, heartbeat=time.time(), started='now')
  with pytest.raises(ConfigError, match='is in use by the run of pid 1 on elsewhere'):
    checkpoint.WorkdirLock(str(tmp_path)).__enter__()


def test_a_pid_used_again_or_a_lock_from_before_a_reboot_is_taken_over(tmp_path):
  """A container restart hands the dead run's pid to another process: the pid alone would refuse forever."""
  live = os.getppid()  # A live process of this machine, not this one.
  here = {'host': socket.gethostname(), 'pid': live, 'boot_id': lock.boot_id()}
  assert lock.boot_id() and lock.process_start(live) and lock.process_start(2 ** 22 + 7) is None
  for stale in ({'process_start': lock.process_start(live) + 1},  # The pid now names a later process.
                {'process_start': lock.process_start(live), 'boot_id': 'an-earlier-boot'}):
    write_lock(tmp_path, **dict(here, **stale))
    with checkpoint.WorkdirLock(str(tmp_path)):
      holder = json.loads((tmp_path / 'lock.json').read_text())
      assert holder['pid'] == os.getpid() and holder['process_start'] == lock.process_start(os.getpid())
  write_lock(tmp_path, **dict(here, process_start=lock.process_start(live)))  # That very process: it holds the lock.
  with pytest.raises(ConfigError, match=f'is in use by the run of pid {live}'):
    checkpoint.WorkdirLock(str(tmp_path)).__enter__()
  write_lock(tmp_path, host=socket.gethostname(), pid=live)  # A lock without the start (older runs): the pid decides.
  with pytest.raises(ConfigError, match=f'is in use by the run of pid {live}'):
    checkpoint.WorkdirLock(str(tmp_path)).__enter__()
