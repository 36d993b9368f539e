"""The temperature search's own pieces: start from a pretrained run, choose the start, record the result.

The search itself is the ordinary training loop with `train.trainable='temperature'`: the
trainable partition is the layers x heads temperatures and everything else is frozen.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from nopejax import checkpoint, config, model, paths, step as step_lib
from nopejax.config import ConfigError
from nopejax.model import Temperature


def temperatures_by_layer(state, name='temperature') -> list[list[float]]:
  """[layer][head] temperatures of any state holding them (a model state or the search's params);
  name='temperature_slope' gives the log schedule's slopes a_h ([] for another schedule)."""
  blocks = nnx.to_pure_dict(nnx.filter_state(state, Temperature))['blocks']
  return [np.asarray(jax.device_get(blocks[i]['attention'][name]), np.float64).tolist()
          for i in sorted(blocks) if name in blocks[i]['attention']]


def read_temperatures(source) -> dict:
  """{'temperature': [layer][head] c_h, plus 'temperature_slope': a_h if recorded} from a search's
  temperatures.json (`source` is that file or the search's workdir)."""
  path = paths.resolve(source)
  if not path.name.endswith('.json'):
    path = path / 'temperatures.json'
  if not path.exists():
    raise ConfigError(f'search.init_from={source} holds no temperatures.json; point it at a finished search --workdir.')
  record = json.loads(path.read_text())
  return {'temperature': record['temperatures'], **({'temperature_slope': record['slopes']} if 'slopes' in record else {})}


def set_temperatures_by_layer(state, values) -> object:
  """`state` with blocks[l].attention.<name> set to values[name][l] ([heads]) for each name in `values`
  ('temperature', 'temperature_slope'); variables not named keep their values, dtypes and shardings."""
  def set_value(path, v):
    keys = [getattr(k, 'key', None) for k in path]
    name = keys[-1]
    if not (isinstance(v, Temperature) and name in values and keys[0] == 'blocks'):
      return v
    layer = keys[1]
    row = np.asarray(values[name][layer], np.float32) if layer < len(values[name]) else None
    if row is None or row.shape != v[...].shape:
      raise ConfigError(f'search.init_from gives {name} of shape {None if row is None else row.shape} for layer {layer}, '
                        f'but this model has {v[...].shape}; start from a search of the same model.')
    return v.replace(jnp.asarray(row, v[...].dtype))
  return jax.tree_util.tree_map_with_path(set_value, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def uniform_sweep(cfg, params, frozen, validation_loss):
  """The best uniform temperature for the target length: validation loss at data.seq_len for each
  candidate c (for ssmax, the multiplier at L: model.set_temperatures)."""
  losses = {}
  for c in cfg.search.init_candidates:
    losses[c] = validation_loss(model.set_temperatures(params, c, cfg), frozen)
    logging.info('search.init sweep: c=%.2f validation loss %.4f', c, losses[c])
  best = min(losses, key=losses.get)
  return best, losses


def start_state(cfg, workdir, graphdef, abstract, shardings, tx, validation_loss):
  """A fresh search state: the base run's weights (on this mesh), temperatures at search.init.

  Returns (state, base) where base = {'workdir', 'step'} names the checkpoint the weights came from.
  """
  base_dir = paths.resolve(cfg.search.base)
  base_step = checkpoint.latest_step(base_dir)
  if base_step is None:
    raise ConfigError(f'search.base={cfg.search.base} holds no checkpoint; point it at a pretraining --workdir.')
  model_state = checkpoint.restore_model(base_dir, cfg, step_lib.model_state(abstract), base_step)
  # The search's checkpoints point at this step: pin it so the base run's rotation keeps it.
  if jax.process_index() == 0:
    pinned = checkpoint.pin(base_dir, base_step, workdir)
    logging.info('Pinned step %d of %s for this search (%s): its rotation keeps that step.', base_step, base_dir, pinned)
  if base_step not in checkpoint.all_steps(base_dir):
    raise ConfigError(f'Step {base_step} of search.base={cfg.search.base} was rotated away while this search started; '
                      'run it again.')
  params, frozen = step_lib.split_model_state(cfg, graphdef, model_state)
  if cfg.search.init_from:
    # A warm start: another search's c_h (and a_h, if it has them; else the base's, 0 for a log search).
    values = read_temperatures(cfg.search.init_from)
    if cfg.model.temperature_schedule != 'log':
      values.pop('temperature_slope', None)
    logging.info('Temperature search from %s step %d, temperatures from %s (%s).', base_dir, base_step,
                 cfg.search.init_from, ', '.join(values))
    params = jax.device_put(set_temperatures_by_layer(params, values), shardings['params'])
    return _fresh_state(params, frozen, shardings, tx), {'workdir': str(base_dir), 'step': base_step}
  init = config.search_init(cfg)
  if init == 'auto':
    init, losses = uniform_sweep(cfg, params, frozen, validation_loss)
    if jax.process_index() == 0:
      paths.write_text(paths.resolve(workdir) / 'search_init.json', json.dumps(
          {'chosen': init, 'validation_loss': {str(c): l for c, l in losses.items()}}, indent=2))
  logging.info('Temperature search from %s step %d, every temperature starting at %.2f.', base_dir, base_step, init)
  params = jax.device_put(model.set_temperatures(params, init, cfg), shardings['params'])
  return _fresh_state(params, frozen, shardings, tx), {'workdir': str(base_dir), 'step': base_step}


def _fresh_state(params, frozen, shardings, tx):
  return {'step': jax.device_put(jnp.int32(0), shardings['step']), 'params': params,
          'frozen': frozen, 'opt': jax.jit(tx.init, out_shardings=shardings['opt'])(params)}


def write_temperatures(workdir, temperatures, slopes=()) -> None:
  """WORKDIR/temperatures.json (with the log schedule's slopes, if any) and a layers x heads heatmap, temperatures.png."""
  if jax.process_index() != 0:
    return
  workdir = paths.resolve(workdir)
  record = {'temperatures': temperatures, **({'slopes': slopes} if slopes else {})}
  paths.write_text(workdir / 'temperatures.json', json.dumps(record, indent=1))
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  grid = np.array(temperatures)
  fig, ax = plt.subplots(figsize=(1 + 0.35 * grid.shape[1], 1 + 0.35 * grid.shape[0]), constrained_layout=True)
  image = ax.imshow(grid, cmap='viridis', aspect='auto')
  ax.set_xlabel('head')
  ax.set_ylabel('layer')
  ax.set_title('searched temperature c_h')
  fig.colorbar(image, ax=ax)
  with (workdir / 'temperatures.png').open('wb') as f:
    fig.savefig(f, format='png', dpi=120)
  plt.close(fig)
