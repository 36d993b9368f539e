"""What a checkpoint's meta records of the run that saved it, and the checks of it against a config
that come before any array is read: a checkpoint of another model, run kind, optimizer partition
or temperature schedule is refused in one sentence naming the key and the fix."""
from nopejax import config, positions
from nopejax.config import ConfigError

SHAPE_KEYS = ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim')
# Keys that change what the same arrays compute; a checkpoint's meta that lacks one had its default.
# rope_layers: a hybrid's flags as '1,1,1,0' ('every:4' recorded so too), '' for a uniform model.
ARCHITECTURE_DEFAULTS = {'position': 'nope', 'rope_theta': 10000.0, 'tie_embeddings': False, 'rope_layers': ''}


def model_shape(cfg) -> dict:
  shape = {key: cfg.model[key] for key in SHAPE_KEYS + tuple(ARCHITECTURE_DEFAULTS)}
  shape['head_dim'] = config.head_dim(cfg)
  shape['rope_layers'] = positions.flags_string(positions.layer_flags(cfg.model.rope_layers, cfg.model.num_layers))
  return shape


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


def check_schedule(meta, cfg, where, resume: bool) -> None:
  """A checkpoint's temperature schedule against the config's (restore_model checks the octaves).

  A model may gain the log schedule's slopes (they start at 0: the same model) but never lose them.
  A resume must not change what the saved temperatures mean (constant and ssmax read the same
  arrays differently), nor add slopes that the optimizer trains: its state would not fit."""
  saved, ours = meta.get('temperature_schedule', 'constant'), cfg.model.temperature_schedule
  gains_slopes = saved == 'constant' and ours == 'log'
  if saved == ours or (gains_slopes and not (resume and cfg.train.trainable != 'model')) or (
      not resume and saved != 'log'):
    return
  raise ConfigError(f'{where} was saved with model.temperature_schedule={saved!r} but the config asks for {ours!r}; '
                    f'pass --config.model.temperature_schedule={saved} or use another --workdir.')


def check_resume(meta, cfg, where) -> None:
  """What a resumed run must share with the run that saved `meta`, beyond the model's shape."""
  kind = 'search' if is_search(cfg) else 'pretrain'
  if meta['kind'] != kind:
    raise ConfigError(
        f'{where} holds a {meta["kind"]} run but the config describes a {kind} run; '
        'set train.trainable to match or use another --workdir.')
  if meta.get('weights_only'):
    return  # No optimizer state: the run starts a fresh one for whatever the config trains.
  trainable = meta.get('trainable', cfg.train.trainable)  # A meta without it: the opt tree check decides.
  if trainable != cfg.train.trainable:
    raise ConfigError(f'{where} was saved by a run with train.trainable={trainable!r} but the config asks for '
                      f'{cfg.train.trainable!r}; pass --config.train.trainable={trainable} or use another --workdir.')
  check_schedule(meta, cfg, where, resume=True)


def is_search(cfg):
  return cfg.train.trainable == 'temperature'


def schedule_of(cfg) -> dict:
  return {key: cfg.model[key] for key in ('temperature_schedule', 'temperature_octaves', 'temperature_octave_shape')}
