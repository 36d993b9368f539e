"""A run's checkpoints and its hold on its workdir.

  io            orbax checkpoints: save, resume (onto any mesh, past damaged steps), restore a
                model, weights-only checkpoints, and the pins that keep a search's base step
  meta          what a checkpoint records of its run, checked against the config before any read
  reads         a failed read told apart: another config's checkpoint, storage trouble (retried),
                or damage
  disk          directories checked writable before the work that fills them; a write the disk
                refuses (full, read-only) told in one sentence
  load          `load(workdir)`: a workdir's latest model and config, for notebooks and tools
  lock          WorkdirLock: one run at a time in a workdir
  stop_signals  StopSignals: SIGTERM or SIGINT saves and stops at a step boundary
"""
from nopejax.checkpoint.io import (
    ARCHITECTURE_DEFAULTS, SHAPE_KEYS, DamagedCheckpoint, UnreadableCheckpoint, all_steps, check_shape,
    checkpoint_dir, latest_step, make_manager, model_shape, pin, pinned_steps, pins_dir, read_meta, restore,
    restore_model, restore_newest, restore_newest_model, save, save_weights, step_dir)
from nopejax.checkpoint.disk import check_writable
from nopejax.checkpoint.load import load, load_with_step
from nopejax.checkpoint.lock import WorkdirLock
from nopejax.checkpoint.stop_signals import StopSignals
