"""The one config object: its defaults (`get_config()`, every key declared in nopejax/defaults.py),
checking, loading and saving it."""
import importlib.util
import json
import math
import os
import pathlib
import sys

import ml_collections
from etils import epath

from nopejax import config_checks
from nopejax.defaults import get_config, search_recipe  # noqa: F401 (public here: configs start from them)
from nopejax.positions import POSITIONS, ROPE_SCALINGS, layer_flags

DTYPES = ('float32', 'bfloat16')
TRAINABLE = ('model', 'temperature', 'model+temperature')
TEMPERATURE_SCHEDULES = ('constant', 'log', 'ssmax')
OCTAVE_SHAPES = ('ramp', 'step')
ATTENTION_IMPLS = ('auto', 'xla', 'chunked', 'splash', 'cudnn')
REMAT = ('none', 'full', 'save_dots', 'save_dots_no_batch', 'save_qkv_proj', 'offload')  # model.py: what each keeps.


class ConfigError(ValueError):
  """Bad input the user can fix; its message is one sentence naming the key and the fix."""


def exit_with_sentence(message: str, code: int = 2):
  """How the command lines end on bad input: `error: message` on stderr, the exit code, and nothing
  after it. Orbax's and tensorstore's unfinished asynchronous work (a failed restore's other reads)
  may still print tracebacks at exit, so stderr is closed off first."""
  print(f'error: {message}', file=sys.stderr)
  sys.stderr.flush()
  os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
  sys.exit(code)


def remat_name(value) -> str:
  """model.remat as one of REMAT; True and False (configs before the policies) mean 'full' and 'none'."""
  return {True: 'full', False: 'none'}[value] if isinstance(value, bool) else value


def head_dim(cfg) -> int:
  return cfg.model.head_dim or cfg.model.embed_dim // cfg.model.num_heads


def temperature_length(cfg) -> int:
  """L of the position-dependent temperature schedules: model.temperature_length, or data.seq_len."""
  return cfg.model.temperature_length or cfg.data.seq_len


def search_lengths(cfg) -> tuple[int, ...]:
  """The target lengths the loss averages over: search.lengths, or data.seq_len alone."""
  return tuple(cfg.search.lengths) or (cfg.data.seq_len,)


def search_init(cfg):
  """`search.init` as a float, or the string 'auto'."""
  if cfg.search.init == 'auto':
    return 'auto'
  try:
    init = float(cfg.search.init)
  except ValueError:
    init = math.nan
  if not math.isfinite(init):
    raise ConfigError(f"search.init={cfg.search.init!r} is neither a finite number nor 'auto'; set it to e.g. 1.6 or auto.")
  return init


def search_min_slope(cfg):
  """`search.min_slope` as a float, or None ('' : the log schedule's slopes are free)."""
  if cfg.search.min_slope == '':
    return None
  try:
    slope = float(cfg.search.min_slope)
  except ValueError:
    slope = math.nan
  if not math.isfinite(slope):
    raise ConfigError(f"search.min_slope={cfg.search.min_slope!r} is neither a finite number nor ''; set it to e.g. 0 or ''.")
  return slope


def _flat_keys(cfg, prefix=''):
  keys = set()
  for key, value in cfg.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      keys |= _flat_keys(value, f'{prefix}{key}.')
    else:
      keys.add(f'{prefix}{key}')
  return keys


def is_declared(key: str) -> bool:
  """Whether a dotted key such as 'train.steps' is declared in nopejax/defaults.py."""
  return key in _flat_keys(get_config())


def validate(cfg) -> None:
  """Raises ConfigError for the first problem found; returns None for a usable config."""
  unknown = sorted(_flat_keys(cfg) - _flat_keys(get_config()))
  if unknown:
    raise ConfigError(f'Unknown config key {unknown[0]}; every key is declared in nopejax/defaults.py, check the spelling there.')
  problem = config_checks.out_of_range(cfg, get_config())  # Each numeric key alone; below, keys together.
  if problem:
    raise ConfigError(problem)
  m = cfg.model
  if m.position not in POSITIONS:
    raise ConfigError(f'model.position={m.position!r} is not one of {POSITIONS}; pick one of those.')
  if m.dtype not in DTYPES:
    raise ConfigError(f'model.dtype={m.dtype!r} is not one of {DTYPES}; pick one of those.')
  if m.attention_impl not in ATTENTION_IMPLS:
    raise ConfigError(f'model.attention_impl={m.attention_impl!r} is not one of {ATTENTION_IMPLS}; pick one of those.')
  if m.attention_impl == 'cudnn' and m.dtype != 'bfloat16':
    raise ConfigError(f"model.attention_impl='cudnn' needs model.dtype='bfloat16', not {m.dtype!r}; set model.dtype=bfloat16 or model.attention_impl=auto.")
  if m.attention_impl == 'cudnn' and cfg.data.separate_documents:
    raise ConfigError("model.attention_impl='cudnn' cannot mask packed documents apart (data.separate_documents=True) "
                      'under grouped-query attention here; set data.separate_documents=False or model.attention_impl=chunked.')
  if not m.head_dim and m.embed_dim % m.num_heads:
    raise ConfigError(
        f'model.num_heads={m.num_heads} does not divide model.embed_dim={m.embed_dim}; '
        'change model.num_heads (or set model.head_dim explicitly).')
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(
        f'model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads}; '
        'change model.num_kv_heads to a divisor of it.')
  if m.position == 'rope' and (head_dim(cfg) % 2 or m.rope_theta <= 1):
    raise ConfigError(
        f'model.position=rope needs an even head dimension and model.rope_theta > 1 (got {head_dim(cfg)} and '
        f'{m.rope_theta}); change model.head_dim or model.rope_theta.')
  try:
    flags = layer_flags(m.rope_layers, m.num_layers)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if flags is not None and m.position != 'rope':
    raise ConfigError(f'model.rope_layers={m.rope_layers!r} picks the RoPE layers of a RoPE model but model.position='
                      f"{m.position!r}; set model.position=rope (its settings apply to the flagged layers) or model.rope_layers=''.")
  if remat_name(m.remat) not in REMAT:
    raise ConfigError(f'model.remat={m.remat!r} is not one of {REMAT}; pick one of those.')
  if m.rope_scaling not in ROPE_SCALINGS:
    raise ConfigError(f'model.rope_scaling={m.rope_scaling!r} is not one of {ROPE_SCALINGS}; pick one of those.')
  if m.rope_scaling != 'none' and m.position != 'rope':
    raise ConfigError(f'model.rope_scaling={m.rope_scaling!r} scales RoPE but model.position={m.position!r}; '
                      "set model.position=rope or model.rope_scaling=none.")
  if not (m.rope_scaling_factor == 0 or m.rope_scaling_factor >= 1):
    raise ConfigError(f'model.rope_scaling_factor={m.rope_scaling_factor} must be at least 1 (or 0 for each length / L); '
                      'set e.g. 4.0.')
  if not (m.yarn_beta_slow < m.yarn_beta_fast and m.llama3_low_freq_factor < m.llama3_high_freq_factor):
    raise ConfigError('model.yarn_beta_slow < model.yarn_beta_fast and model.llama3_low_freq_factor < '
                      'model.llama3_high_freq_factor must hold, all positive; keep the defaults (1, 32 and 1, 4).')
  if m.logn and (m.original_length or cfg.data.seq_len) < 2:
    raise ConfigError('model.logn divides by ln L, which needs model.original_length (or data.seq_len) of at least 2; set it.')
  if m.position in ('alibi', 'kerple') and m.attention_impl in ('splash', 'cudnn'):
    raise ConfigError(f'model.attention_impl={m.attention_impl!r} takes no bias on the logits, which model.position='
                      f'{m.position} adds; set model.attention_impl=auto (chunked on TPU and GPU then), chunked or xla.')
  if m.temperature_schedule not in TEMPERATURE_SCHEDULES:
    raise ConfigError(f'model.temperature_schedule={m.temperature_schedule!r} is not one of {TEMPERATURE_SCHEDULES}; pick one of those.')
  if m.temperature_schedule == 'ssmax' and temperature_length(cfg) < 2:
    raise ConfigError(f'model.temperature_length={m.temperature_length} must be 0 (= data.seq_len) or a positive length '
                      '(at least 2 for ssmax, whose start divides by ln L); set it to the pretraining length.')
  if (m.temperature_schedule == 'log' and cfg.train.trainable == 'temperature' and not m.temperature_length):
    raise ConfigError("model.temperature_schedule='log' in a search needs model.temperature_length, the pretraining "
                      'length below which the temperature stays 1 (data.seq_len is the search length); set it, e.g. 64.')
  if not isinstance(m.temperature_octaves, int) or (m.temperature_octaves > 1 and m.temperature_schedule != 'log'):
    raise ConfigError(f'model.temperature_octaves={m.temperature_octaves!r} must be a positive integer, above 1 only '
                      "with model.temperature_schedule='log'; set it to 1, or pick the log schedule.")
  if m.temperature_octave_shape not in OCTAVE_SHAPES:
    raise ConfigError(f'model.temperature_octave_shape={m.temperature_octave_shape!r} is not one of {OCTAVE_SHAPES}; '
                      'pick one of those.')
  if not isinstance(cfg.search.share_slopes, bool) or (cfg.search.share_slopes and m.temperature_schedule != 'log'):
    raise ConfigError(f'search.share_slopes={cfg.search.share_slopes!r} must be True or False, and True only with '
                      "model.temperature_schedule='log' (the slopes it shares); set it to False or pick the log schedule.")
  t = cfg.train
  if t.trainable not in TRAINABLE:
    raise ConfigError(f'train.trainable={t.trainable!r} is not one of {TRAINABLE}; pick one of those.')
  if t.batch_size % t.microbatches:
    raise ConfigError(f'train.microbatches={t.microbatches} does not divide train.batch_size={t.batch_size}; '
                      'set it to a divisor of the batch (1 = no accumulation).')
  if t.loss_chunk and cfg.data.seq_len > t.loss_chunk and cfg.data.seq_len % t.loss_chunk:
    raise ConfigError(f'train.loss_chunk={t.loss_chunk} does not divide data.seq_len={cfg.data.seq_len}; '
                      'set it to a divisor of the length, or 0 for the whole sequence at once.')
  if cfg.search.base and t.trainable != 'temperature':
    raise ConfigError("search.base is set but train.trainable is 'model'; set --config.train.trainable=temperature or clear search.base.")
  lengths = search_lengths(cfg)
  if min(lengths) < 1 or max(lengths) > cfg.data.seq_len:
    raise ConfigError(f'search.lengths={tuple(cfg.search.lengths)} must be positive lengths up to data.seq_len='
                      f'{cfg.data.seq_len} (the window every length is cut from); set data.seq_len to the longest.')
  init = search_init(cfg)
  search_min_slope(cfg)
  if t.trainable == 'temperature':
    problem = config_checks.search_start_problem(init, cfg.search.init_candidates, cfg.search.min_temperature)
    if problem:
      raise ConfigError(problem)


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """Overlays saved values (e.g. a workdir's config.json) on the declared defaults."""
  cfg = get_config()

  def overlay(node, values, prefix):
    for key, value in values.items():
      if key not in node:
        raise ConfigError(f'Unknown config key {prefix}{key}; every key is declared in nopejax/defaults.py, check the spelling there.')
      if isinstance(node[key], ml_collections.ConfigDict):
        overlay(node[key], value, f'{prefix}{key}.')
      elif key == 'remat' and isinstance(value, bool):  # A bool before the policies (older config.json files).
        node[key] = remat_name(value)
      else:
        node[key] = _as_tuples(value) if isinstance(node[key], tuple) else value

  overlay(cfg, values, '')
  return cfg


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def from_file(path) -> ml_collections.ConfigDict:
  """`get_config()` of a config file given by path (names like configs/1b.py are no module names);
  'FILE.py:ARG' calls get_config(ARG), as --config does."""
  path, *arg = str(path).split(':', 1)
  spec = importlib.util.spec_from_file_location(f'config_{pathlib.Path(path).stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*arg)


def to_json(cfg) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def load_json(path) -> ml_collections.ConfigDict:
  """A config.json written by to_json, from any path or URL."""
  return from_dict(json.loads(epath.Path(path).read_text()))
