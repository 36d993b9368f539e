"""A workdir's model for notebooks, evaluation and export: `load(workdir)` gives (model, config)
of its latest checkpoint on one device, whatever the mesh it was trained on."""
import jax
from flax import nnx

from nopejax import config, paths
from nopejax.checkpoint.io import restore_newest_model
from nopejax.config import ConfigError
from nopejax.model import Transformer, set_temperatures


def load_with_step(workdir, temperature=None):
  """(model, config, step) of the newest checkpoint in any workdir nopejax writes that reads back
  whole, on the default device; a damaged newer step is passed over with a warning, never renamed.

  `temperature` replaces every head's temperature by that uniform value (a zero-shot c).
  """
  config_path = paths.resolve(workdir) / 'config.json'
  if not config_path.exists():
    raise ConfigError(f'{workdir} has no config.json, so it is not a nopejax workdir; pass the --workdir of a run.')
  try:
    cfg = config.load_json(config_path)
  except ValueError as e:  # Cut short or hand-edited; a ConfigError (an unknown key) says so itself.
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f'{config_path} is not valid JSON ({e}); restore it from config_history.jsonl, which holds '
                      "every start's config.") from None
  abstract_model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  graphdef, abstract_model_state = nnx.split(abstract_model)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract_model_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_model_state)
  model_state, step = restore_newest_model(workdir, cfg, abstract_model_state)
  if temperature is not None:
    model_state = set_temperatures(model_state, temperature, cfg)  # For ssmax, the multiplier at L.
    cfg.model.temperature = temperature
  return nnx.merge(graphdef, model_state), cfg, step


def load(workdir, temperature=None):
  """(model, config) of load_with_step."""
  return load_with_step(workdir, temperature)[:2]
