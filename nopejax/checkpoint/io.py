"""Checkpoints with orbax: save and resume train states, restore onto any mesh, pin a search's base step.

A checkpoint step holds four items:
  model  the model's arrays as a nested dict: all of them for a pretrain run, only the
         temperatures for a search run (its weights live in the base run it points to);
  opt    the optimizer state of the trainable partition;
  data   the training data's position (JSON, one entry per global batch row), so a resumed run
         sees the same batches, with any number of processes;
  meta   JSON: step, kind ('pretrain' or 'search'), the model's shape, and the base run.
A weights-only checkpoint (meta `weights_only`, e.g. a converted Hugging Face model) holds only
model and meta: training resumed from it starts a fresh optimizer and data stream at its step.
"""
import hashlib
import json
import logging as logging_std
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from nopejax import config, optim, paths, step as step_lib
from nopejax.config import ConfigError
from nopejax.model import Temperature, TemperatureSlope

SHAPE_KEYS = ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim')
# Keys that change what the same arrays compute; a checkpoint's meta that lacks one had its default.
ARCHITECTURE_DEFAULTS = {'position': 'nope', 'rope_theta': 10000.0, 'tie_embeddings': False}


def model_shape(cfg) -> dict:
  shape = {key: cfg.model[key] for key in SHAPE_KEYS + tuple(ARCHITECTURE_DEFAULTS)}
  shape['head_dim'] = config.head_dim(cfg)
  return shape


def checkpoint_dir(workdir) -> epath.Path:
  return paths.resolve(workdir) / 'checkpoints'


class DamagedCheckpoint(ConfigError):
  """A checkpoint step whose files cannot be read back (a resume falls back past it)."""


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


def read_meta(workdir, step) -> dict:
  with _reader(workdir) as mgr:
    try:
      return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # Orbax raises many types for unreadable files.
      raise DamagedCheckpoint(
          f'The checkpoint at {checkpoint_dir(workdir)}/{step} cannot be read ({type(e).__name__}); '
          'delete that step directory to fall back to an older one, or use another --workdir.') from None


def check_shape(meta, cfg, where) -> None:
  """A checkpoint must hold a model of the configured shape; name the first key that differs."""
  ours = model_shape(cfg)
  for key in ours:
    theirs = meta['model'].get(key, ARCHITECTURE_DEFAULTS.get(key))
    if key == 'rope_theta' and ours['position'] != 'rope':
      continue  # Unused without RoPE.
    if theirs != ours[key]:
      raise ConfigError(
          f'{where} holds a model with model.{key}={theirs} but the config asks for {ours[key]}; '
          f'set --config.model.{key}={theirs} or use another directory.')


def _is_search(cfg):
  return cfg.train.trainable == 'temperature'


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
  saved = nnx.filter_state(model_state, Temperature) if _is_search(cfg) else model_state
  step = int(state['step'])
  meta = {'step': step, 'kind': 'search' if _is_search(cfg) else 'pretrain', 'model': model_shape(cfg), 'base': base,
          'temperature_schedule': cfg.model.temperature_schedule, 'temperature_octaves': cfg.model.temperature_octaves,
          'temperature_octave_shape': cfg.model.temperature_octave_shape}
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
  meta = {'step': step, 'kind': 'pretrain', 'model': model_shape(cfg), 'base': None, 'weights_only': True}
  with make_manager(workdir, cfg) as manager:
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.to_pure_dict(model_state)), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


# When a restore fails, its other reads still finish: tensorstore calls back into orbax's closed
# event loop (Python prints each as an unraisable 'Event loop is closed' traceback) and orbax's
# other read tasks end with exceptions nobody retrieves (asyncio logs each). The damaged
# checkpoint is reported in one sentence; these echoes of it, and only these, are dropped.
def _ignore_late_callbacks_of_failed_reads(unraisable, previous=sys.unraisablehook):
  if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'):
    previous(unraisable)


class _UnretrievedOrbaxReads(logging_std.Filter):
  def filter(self, record):
    message = record.getMessage()
    return not (message.startswith('Task exception was never retrieved') and 'orbax' in message)


def _restore_items(workdir, step, **items):
  sys.unraisablehook = _ignore_late_callbacks_of_failed_reads
  if not any(isinstance(f, _UnretrievedOrbaxReads) for f in logging_std.getLogger('asyncio').filters):
    logging_std.getLogger('asyncio').addFilter(_UnretrievedOrbaxReads())
  with _reader(workdir) as mgr:
    try:
      return mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise DamagedCheckpoint(
          f'The checkpoint at {checkpoint_dir(workdir)}/{step} does not fit this model or is damaged '
          f'({type(e).__name__}: {str(e).splitlines()[0][:200]}); use a matching config or another --workdir.') from None


def _zero_slopes(abstract_model_state):
  """The state with every TemperatureSlope a zero array, in its sharding."""
  def zero(v):
    if not isinstance(v, TemperatureSlope):
      return v
    return v.replace(jax.device_put(np.zeros(v.shape, v.dtype), v.get_value().sharding))
  return jax.tree.map(zero, abstract_model_state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def restore_model(workdir, cfg, abstract_model_state, step=None):
  """The full model state saved in `workdir`, laid out as `abstract_model_state` says (any mesh).

  A search run's checkpoint holds only temperatures: its weights come from its base run.
  """
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise ConfigError(f'{workdir} holds no checkpoint; train there first or point to a directory that has one.')
  meta = read_meta(workdir, step)
  check_shape(meta, cfg, f'The checkpoint in {workdir}')
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
  kind = 'search' if _is_search(cfg) else 'pretrain'
  if meta['kind'] != kind:
    raise ConfigError(
        f'{workdir} holds a {meta["kind"]} run but the config describes a {kind} run; '
        'set train.trainable to match or use another --workdir.')
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
  problem is the error (a config that does not fit fails every step alike)."""
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
