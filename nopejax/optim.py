"""What trains and how: the trainable partition (model weights or temperatures), AdamW, schedule, clamp.

Pretraining and the temperature search share this code path. The model state is split into a
trainable partition and a frozen one; the optimizer only ever sees the trainable partition, so the
frozen one has no optimizer state, no gradient, and no part in gradient clipping.
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nopejax.model import Temperature, TemperatureSlope


def trainable_filter(cfg):
  """The nnx filter for what `train.trainable` names."""
  if cfg.train.trainable == 'temperature':
    return Temperature
  if cfg.train.trainable == 'model+temperature':
    return nnx.Param
  return nnx.All(nnx.Param, nnx.Not(Temperature))


def learning_rate_schedule(cfg, peak=None) -> optax.Schedule:
  """train.*'s warmup then cosine, to `peak` (default train.learning_rate)."""
  t = cfg.train
  peak = t.learning_rate if peak is None else peak
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=t.warmup_steps,
      decay_steps=t.steps, end_value=peak * t.final_lr_fraction)


def _decay_mask(params):
  # Decay matrices only: norms' scales and temperatures are vectors and stay undecayed.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _adamw(cfg, learning_rate, weight_decay, clip_norm, decay_mask) -> optax.GradientTransformation:
  t = cfg.train
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(learning_rate_schedule(cfg, learning_rate), b1=t.b1, b2=t.b2, eps=t.eps,
                  weight_decay=weight_decay, mask=decay_mask),
  )


def partition_labels(params):
  """'temperature' for every temperature (slopes too), 'model' for every other parameter."""
  return jax.tree.map(lambda v: 'temperature' if isinstance(v, Temperature) else 'model', params,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))


def make_optimizer(cfg) -> optax.GradientTransformation:
  t = cfg.train
  weights = _adamw(cfg, t.learning_rate, t.weight_decay, t.clip_norm, _decay_mask)
  if t.trainable != 'model+temperature':
    return weights
  # Two partitions, each clipped by its own global norm, with its own rate and decay: the few
  # temperatures would otherwise be clipped by the weights' gradient norm and move at their rate.
  # Their decay (default 0) pulls every temperature toward 0, vectors included.
  temperatures = _adamw(cfg, t.temperature.learning_rate, t.temperature.weight_decay, t.temperature.clip_norm, None)
  return optax.multi_transform({'model': weights, 'temperature': temperatures}, partition_labels)


def clamp_temperatures(params, minimum: float, min_slope: float | None = None, share_slopes: bool = False):
  """Projects every temperature in `params` onto c >= minimum (the paper's focus constraint), and the
  log schedule's slopes onto a_h >= min_slope (None: left free) and, with share_slopes, onto one
  value per layer (and octave): the mean over the heads, their last axis."""
  def clamp(v):
    if isinstance(v, TemperatureSlope):
      slope = v[...]
      if share_slopes:
        slope = jnp.broadcast_to(slope.mean(axis=-1, keepdims=True), slope.shape)
      return v.replace(slope if min_slope is None else jnp.maximum(slope, min_slope))
    return v.replace(jnp.maximum(v[...], minimum)) if isinstance(v, Temperature) else v
  return jax.tree.map(clamp, params, is_leaf=lambda v: isinstance(v, nnx.Variable))
