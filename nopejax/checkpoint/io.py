"""Checkpoints with orbax: save and resume train states, restore onto any mesh, pin a search's base step.

A checkpoint step holds four items:
  model  the model's arrays as a nested dict: all of them for a pretrain run, only the
         temperatures for a search run (its weights live in the base run it points to);
  opt    the optimizer state of the trainable partition;
  data   the training data's position (JSON, one entry per global batch row), so a resumed run
         sees the same batches, with any number of processes;
  meta   JSON: step, kind ('pretrain' or 'search'), train.trainable, the model's shape and
         temperature schedule, and the base run: checked against the config before any array is read.
A weights-only checkpoint (meta `weights_only`, e.g. a converted Hugging Face model) holds only
model and meta: training resumed from it starts a fresh optimizer and data stream at its step.
"""
import contextlib
import hashlib
import json
import logging as logging_std
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from nopejax import optim, paths, step as step_lib
from nopejax.checkpoint import reads
from nopejax.checkpoint.meta import (  # noqa: F401 (public here)
    ARCHITECTURE_DEFAULTS, SHAPE_KEYS, check_resume, check_schedule, check_shape, is_search, model_shape, schedule_of)
from nopejax.checkpoint.reads import DamagedCheckpoint, UnreadableCheckpoint  # noqa: F401 (public here)
from nopejax.config import ConfigError
from nopejax.model import Temperature, TemperatureSlope

def checkpoint_dir(workdir) -> epath.Path:
  return paths.resolve(workdir) / 'checkpoints'


def _manager(workdir, options):
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def pins_dir(workdir) -> epath.Path:
  return paths.resolve(workdir) / 'pins'


def pinned_steps(workdir) -> set[int]:
  """Steps that searches built on this run need: never rotated away (see pin)."""
  directory = pins_dir(workdir)
  return {json.loads(p.read_text())['step'] for p in directory.iterdir()} if directory.is_dir() else set()


class _NewestOrPinned(ocp.checkpoint_managers.PreservationPolicy):
  """Keeps the newest train.keep_checkpoints steps and every pinned one; the pins are read at each
  rotation, so a search started while this run trains still keeps its base step."""

  def __init__(self, workdir, keep):
    self.workdir, self.newest = workdir, ocp.checkpoint_managers.LatestN(keep)

  def should_preserve(self, checkpoints, *, context):
    pinned = pinned_steps(self.workdir)
    newest = self.newest.should_preserve(checkpoints, context=context)
    return [keep or info.step in pinned for keep, info in zip(newest, checkpoints)]


def make_manager(workdir, cfg) -> ocp.CheckpointManager:
  # cleanup_tmp_directories: a save cut short (kill -9) leaves a temporary directory; it goes at the next start.
  return _manager(workdir, ocp.CheckpointManagerOptions(
      preservation_policy=_NewestOrPinned(workdir, cfg.train.keep_checkpoints), create=True,
      cleanup_tmp_directories=True))


def pin(base_workdir, step: int, search_workdir) -> epath.Path:
  """Marks `step` of a pretraining run as needed by the search in `search_workdir`, so that the
  base run's rotation keeps it (a search checkpoint holds only temperatures and points there)."""
  search_workdir = paths.resolve(search_workdir)
  digest = hashlib.md5(str(search_workdir).encode()).hexdigest()[:8]
  path = pins_dir(base_workdir) / f'{step}-{search_workdir.name}-{digest}.json'
  try:
    paths.write_text(path, json.dumps({'step': step, 'search': str(search_workdir)}))
  except OSError as e:
    raise ConfigError(
        f'Cannot pin step {step} of search.base={base_workdir} against its rotation ({type(e).__name__}: {e}); '
        f'make that directory writable, or copy its config.json and checkpoints/{step} to a directory '
        'that no run rotates and point search.base there.') from None
  return path


def _reader(workdir) -> ocp.CheckpointManager:
  return _manager(workdir, ocp.CheckpointManagerOptions(create=False))  # read_only=True only adds warnings.


def all_steps(workdir) -> list[int]:
  """The workdir's complete checkpoint steps, oldest first."""
  if not checkpoint_dir(workdir).is_dir():
    return []
  with _reader(workdir) as mgr:
    return sorted(mgr.all_steps())


def latest_step(workdir) -> int | None:
  steps = all_steps(workdir)
  return steps[-1] if steps else None


def step_dir(workdir, step) -> epath.Path:
  return checkpoint_dir(workdir) / str(step)


def read_meta(workdir, step) -> dict:
  def read():
    with _reader(workdir) as mgr:
      return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  return reads.read(step_dir(workdir, step), read)


def _merged_over_processes(local: dict) -> dict:
  """The union of every process's `local` dict (JSON), so that process 0 can save all of it."""
  if jax.process_count() == 1:
    return local
  encoded = np.frombuffer(json.dumps(local).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(encoded)))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:len(encoded)] = encoded
  merged = {}
  for row, length in zip(multihost_utils.process_allgather(padded), lengths):
    merged.update(json.loads(bytes(row[:int(length)]).decode()))
  return merged


def save(manager, state, data_iterator, cfg, base=None) -> None:
  """Saves asynchronously; orbax copies the arrays before this returns, so training can go on.

  Every process calls it at the same step: each contributes its batch rows' data position."""
  model_state = step_lib.model_state(state)
  saved = nnx.filter_state(model_state, Temperature) if is_search(cfg) else model_state
  step = int(state['step'])
  meta = {'step': step, 'kind': 'search' if is_search(cfg) else 'pretrain', 'model': model_shape(cfg), 'base': base,
          'trainable': cfg.train.trainable, **schedule_of(cfg)}
  data_position = data_iterator.get_state()
  data_position['streams'] = _merged_over_processes(data_position['streams'])
  manager.save(step, args=ocp.args.Composite(
      model=ocp.args.StandardSave(nnx.to_pure_dict(saved)),
      opt=ocp.args.StandardSave(state['opt']),
      data=ocp.args.JsonSave(data_position),
      meta=ocp.args.JsonSave(meta)))


def save_weights(workdir, cfg, model_state, step=0) -> None:
  """A weights-only checkpoint of `model_state` (any sharding) at `step`: what `load`, a search's
  `search.base` and evaluation read, and what training resumes from with a fresh optimizer."""
  meta = {'step': step, 'kind': 'pretrain', 'model': model_shape(cfg), 'base': None, 'weights_only': True,
          **schedule_of(cfg)}
  with make_manager(workdir, cfg) as manager:
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.to_pure_dict(model_state)), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


# When a restore fails, its other reads still finish: tensorstore calls back into orbax's closed
# event loop (Python prints each as an unraisable 'Event loop is closed' traceback) and orbax's
# other read tasks end with exceptions nobody retrieves (asyncio logs each). The damaged
# checkpoint is reported in one sentence; these echoes of it, and only these, are dropped.
# The callbacks land within milliseconds after the failure is raised, so the hook stays this long after one.
ECHO_GRACE_S = 2.0
_echoes = {'depth': 0, 'previous': None}  # Restores in flight or in their grace; the hook ours replaced.
_echoes_lock = threading.Lock()


def _drop_late_callbacks(unraisable):
  if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'):
    _echoes['previous'](unraisable)


def _count_echo_window(change: int) -> None:
  """Installs _drop_late_callbacks as the first window opens and puts the hook it replaced back as the
  last one closes (unless something else replaced it meanwhile)."""
  with _echoes_lock:
    if change > 0 and _echoes['depth'] == 0:
      _echoes['previous'], sys.unraisablehook = sys.unraisablehook, _drop_late_callbacks
    _echoes['depth'] += change
    if _echoes['depth'] == 0 and sys.unraisablehook is _drop_late_callbacks:
      sys.unraisablehook = _echoes['previous']


@contextlib.contextmanager
def _late_callbacks_of_failed_reads_ignored():
  """Within, and for ECHO_GRACE_S after a failure: those tracebacks are dropped; any other goes on to
  the hook replaced, which is back afterwards."""
  _count_echo_window(+1)
  try:
    yield
  except BaseException:
    closing = threading.Timer(ECHO_GRACE_S, _count_echo_window, (-1,))
    closing.daemon = True
    closing.start()
    raise
  _count_echo_window(-1)


class _UnretrievedOrbaxReads(logging_std.Filter):
  def filter(self, record):
    message = record.getMessage()
    return not (message.startswith('Task exception was never retrieved') and 'orbax' in message)


@_late_callbacks_of_failed_reads_ignored()  # Each call enters a fresh one.
def _restore_items(workdir, step, **items):
  if not any(isinstance(f, _UnretrievedOrbaxReads) for f in logging_std.getLogger('asyncio').filters):
    logging_std.getLogger('asyncio').addFilter(_UnretrievedOrbaxReads())
  where = step_dir(workdir, step)
  for name, arg in items.items():  # The trees first, from their metadata: a config's mismatch is no damage.
    if isinstance(arg, ocp.args.StandardRestore):
      reads.check_tree(where, name, reads.read(where, lambda name=name: reads.stored_shapes(where / name)), arg.item)

  def read():
    with _reader(workdir) as mgr:
      return mgr.restore(step, args=ocp.args.Composite(**items))
  return reads.read(where, read)


def _zero_slopes(abstract_model_state):
  """The state with every TemperatureSlope a zero array, in its sharding."""
  def zero(v):
    if not isinstance(v, TemperatureSlope):
      return v
    return v.replace(jax.device_put(np.zeros(v.shape, v.dtype), v.get_value().sharding))
  return jax.tree.map(zero, abstract_model_state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def restore_newest_model(workdir, cfg, abstract_model_state):
  """(model state, step) of the newest step in `workdir` that reads back whole. A damaged newer step
  is passed over with a warning and left where it is: evaluation and export only read a workdir
  (the next resume sets it aside). When no step reads back, the newest one's damage is the error."""
  steps = all_steps(workdir)
  if not steps:
    raise ConfigError(f'{workdir} holds no checkpoint; train there first or point to a directory that has one.')
  damaged = []
  for step in reversed(steps):
    try:
      state = restore_model(workdir, cfg, abstract_model_state, step)
    except DamagedCheckpoint as e:
      damaged.append(e)
      continue
    for error in damaged:
      logging.warning('%s Using step %d instead.', error, step)
    return state, step
  raise damaged[0]


def restore_model(workdir, cfg, abstract_model_state, step=None):
  """The full model state saved in `workdir` at `step` (default: restore_newest_model's), laid out
  as `abstract_model_state` says (any mesh).

  A search run's checkpoint holds only temperatures: its weights come from its base run.
  """
  if step is None:
    return restore_newest_model(workdir, cfg, abstract_model_state)[0]
  meta = read_meta(workdir, step)
  check_shape(meta, cfg, f'The checkpoint in {workdir}')
  check_schedule(meta, cfg, f'The checkpoint at {step_dir(workdir, step)}', resume=False)
  octaves = meta.get('temperature_octaves', 1)  # A meta without the key: one slope per head.
  if meta.get('temperature_schedule') == 'log' == cfg.model.temperature_schedule and octaves != cfg.model.temperature_octaves:
    raise ConfigError(f'The checkpoint in {workdir} holds {octaves} log-schedule slope(s) per head but the config asks '
                      f'for {cfg.model.temperature_octaves}; set --config.model.temperature_octaves={octaves}.')
  shape = meta.get('temperature_octave_shape', 'ramp')  # A meta without the key: ramps.
  if meta.get('temperature_schedule') == 'log' == cfg.model.temperature_schedule and octaves > 1 and (
      shape != cfg.model.temperature_octave_shape):
    raise ConfigError(f'The checkpoint in {workdir} holds {shape}-shaped octaves but the config asks for '
                      f"{cfg.model.temperature_octave_shape!r}; set --config.model.temperature_octave_shape={shape}.")
  if meta['kind'] == 'search':
    base, base_step = meta['base']['workdir'], meta['base']['step']
    if base_step not in all_steps(base):
      raise ConfigError(
          f'The search in {workdir} needs step {base_step} of its base run {base}, which is gone (deleted, or '
          f'rotated away before searches pinned their base step); put {base}/checkpoints/{base_step} back, or '
          'run the search again in a new workdir.')
    try:
      state = restore_model(base, cfg, abstract_model_state, base_step)
    except DamagedCheckpoint as e:  # The base's damage, not this run's: no falling back past it.
      raise ConfigError(f'The base run of the search in {workdir} cannot be restored: {e}') from None
    target = nnx.filter_state(abstract_model_state, Temperature)
  else:
    state = jax.tree.map(lambda x: x, abstract_model_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    target = abstract_model_state
    if meta.get('temperature_schedule', 'constant') != 'log':
      # A model without the log schedule's slopes (a search's base, say): they start at 0.
      state = _zero_slopes(state)
      target = nnx.filter_state(abstract_model_state, nnx.Not(TemperatureSlope))
  restored = _restore_items(workdir, step, model=ocp.args.StandardRestore(nnx.to_pure_dict(target)))['model']
  nnx.replace_by_pure_dict(state, restored)
  return state


def restore(workdir, cfg, graphdef, abstract_state, data_iterator, step):
  """Resumes a run in `workdir`: (train state, meta); fills `data_iterator` with its saved position."""
  meta = read_meta(workdir, step)
  check_shape(meta, cfg, f'The checkpoint in {workdir}')
  check_resume(meta, cfg, f'The checkpoint at {step_dir(workdir, step)}')
  model_state = restore_model(workdir, cfg, step_lib.model_state(abstract_state), step)
  params, frozen = step_lib.split_model_state(cfg, graphdef, model_state)
  step_sharding = abstract_state['step'].sharding
  if meta.get('weights_only'):  # Nothing but weights: a fresh optimizer, the data stream from its start.
    opt_shardings = jax.tree.map(lambda x: x.sharding, abstract_state['opt'])
    opt = jax.jit(optim.make_optimizer(cfg).init, out_shardings=opt_shardings)(params)
    state = {'step': jax.device_put(jax.numpy.int32(step), step_sharding), 'params': params, 'frozen': frozen, 'opt': opt}
    return state, meta
  items = _restore_items(
      workdir, step, opt=ocp.args.StandardRestore(abstract_state['opt']), data=ocp.args.JsonRestore())
  data_iterator.set_state(items['data'])
  state = {'step': jax.device_put(jax.numpy.int32(step), step_sharding),
           'params': params, 'frozen': frozen, 'opt': items['opt']}
  return state, meta


def restore_newest(workdir, cfg, graphdef, abstract_state, data_iterator):
  """Resumes from the newest checkpoint that reads back whole: (state, meta, step), or None when
  the workdir has none. Damaged newer steps are renamed STEP.damaged (kept for a look, out of
  orbax's way) with a warning; when no step reads back, nothing is renamed and the newest one's
  damage is the error. A step that does not match the config, or that storage would not hand over
  (reads.UnreadableCheckpoint), stops the run in one sentence with nothing renamed: falling back
  past it would roll the run back."""
  steps = all_steps(workdir)
  damaged = []
  for step in reversed(steps):
    try:
      state, meta = restore(workdir, cfg, graphdef, abstract_state, data_iterator, step)
    except DamagedCheckpoint as e:
      damaged.append((step, e))
      continue
    for bad_step, error in damaged:
      target = _set_aside(workdir, bad_step)
      logging.warning('%s Resuming from step %d instead; the damaged step is kept as %s.', error, step, target)
    return state, meta, step
  if damaged:
    raise damaged[0][1]
  return None


def _set_aside(workdir, step) -> epath.Path:
  source = checkpoint_dir(workdir) / str(step)
  target, n = source.parent / f'{step}.damaged', 1
  while target.exists():
    target, n = source.parent / f'{step}.damaged{n}', n + 1
  if jax.process_index() == 0:
    source.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'nopejax set aside {step}')
  return target
