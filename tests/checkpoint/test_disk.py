"""Directories checked writable before the work that fills them, and a write the disk refuses (full,
read-only) told in one sentence; a run stopped by a full disk resumes once there is space.

Tests run as root, where permissions do not stop a write: a read-only disk is simulated (os.access
and statvfs), a full one by writes that raise ENOSPC as the OS and tensorstore do."""
import errno
import json
import logging
import os
import sys

import orbax.checkpoint as ocp
import pytest

from conftest import small_config
from nopejax import checkpoint, loop, metrics
from nopejax.checkpoint import disk
from nopejax.config import ConfigError

# How tensorstore (orbax's writes) reports a full disk.
TENSORSTORE_FULL = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/d/1": Failed to write 25525 bytes: '
                              "No space left on device [os_error_code='28']")


def test_a_file_in_the_way_or_a_read_only_disk_is_one_sentence(tmp_path, monkeypatch):
  (tmp_path / 'file').write_text('mine')
  disk.check_writable(tmp_path / 'new' / 'run')  # To be made: fine.
  with pytest.raises(ConfigError, match=r'--out .*/file is a file, not a directory; pass a directory path'):
    disk.check_writable(tmp_path / 'file', '--out')
  with pytest.raises(ConfigError, match=r'--workdir .*/file/run lies under the file .*/file, not a directory'):
    disk.check_writable(tmp_path / 'file' / 'run')
  disk.check_writable('gs://bucket/run')  # Left to its first write.
  monkeypatch.setattr(os, 'access', lambda path, mode: False)
  with pytest.raises(ConfigError, match=r'This user may not write to .*/run \(permission denied\); change its '
                                        'permissions or pass another --workdir'):
    disk.check_writable(tmp_path / 'run')
  monkeypatch.setattr(os, 'statvfs', lambda path: type('statvfs', (), {'f_flag': os.ST_RDONLY}))
  with pytest.raises(ConfigError, match=r'.*/run is on a read-only file system; remount it writable or pass another --hf_dir'):
    disk.check_writable(tmp_path / 'run', '--hf_dir')
  assert (tmp_path / 'file').read_text() == 'mine'


def test_refused_writes_are_told_from_other_errors():
  assert disk.refused(OSError(errno.ENOSPC, 'No space left on device')) == errno.ENOSPC
  assert disk.refused(TENSORSTORE_FULL) == errno.ENOSPC
  try:
    try:
      raise OSError(errno.EROFS, 'Read-only file system')
    except OSError as e:
      raise RuntimeError('while saving') from e
  except RuntimeError as e:
    assert disk.refused(e) == errno.EROFS
  assert disk.refused(OSError(errno.ENOENT, 'gone')) is None and disk.refused(ValueError('x')) is None


def test_a_train_workdir_that_cannot_be_written_is_refused_before_the_run(tfds_dir, tmp_path):
  (tmp_path / 'file').write_text('mine')
  for workdir, message in ((tmp_path / 'file', 'is a file, not a directory'),
                           (tmp_path / 'file' / 'run', 'lies under the file')):
    with pytest.raises(ConfigError, match=message):
      loop.run(small_config(tfds_dir), str(workdir))
  assert os.listdir(tmp_path) == ['file'] and (tmp_path / 'file').read_text() == 'mine'


def test_a_full_disk_stops_the_run_in_one_sentence_and_the_run_resumes_once_there_is_space(
    tfds_dir, tmp_path, monkeypatch):
  cfg = small_config(tfds_dir)
  cfg.train.steps, cfg.train.checkpoint_every, cfg.train.warmup_steps = 8, 2, 1
  workdir = str(tmp_path / 'run')
  hook, absl_filters = sys.unraisablehook, list(logging.getLogger('absl').filters)
  full = f'The disk under {workdir} is full .no space left on device., so the run stopped .it resumes from its last ' \
         r'checkpoint.; free space there and run the same command again\.'

  write = metrics.Writer.write
  def metrics_write(self, step, values):  # The metrics file is the first to meet the full disk.
    if step == 5:
      raise OSError(errno.ENOSPC, 'No space left on device')
    write(self, step, values)
  monkeypatch.setattr(metrics.Writer, 'write', metrics_write)
  with pytest.raises(ConfigError, match=full):
    loop.run(cfg, workdir)
  monkeypatch.undo()

  save = ocp.CheckpointManager.save
  def checkpoint_save(self, step, *args, **kwargs):  # Then a checkpoint, as tensorstore reports it.
    if step == 8:
      raise TENSORSTORE_FULL
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', checkpoint_save)
  with pytest.raises(ConfigError, match=full):
    loop.run(cfg, workdir)
  monkeypatch.undo()
  assert checkpoint.all_steps(workdir) == [2, 4, 6] and not os.path.exists(os.path.join(workdir, 'lock.json'))
  assert sys.unraisablehook is hook and logging.getLogger('absl').filters == absl_filters

  loop.run(cfg, workdir)  # Space again: on from step 6, each step logged once.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == list(range(1, 9))
  assert checkpoint.latest_step(workdir) == 8
