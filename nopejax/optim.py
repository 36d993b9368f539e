"""What trains and how: the trainable partition (model weights or temperatures), AdamW, schedule, clamp.

Pretraining and the temperature search share this code path. The model state is split into a
trainable partition and a frozen one; the optimizer only ever sees the trainable partition, so the
frozen one has no optimizer state, no gradient, and no part in gradient clipping.
"""
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nopejax import config
from nopejax.model import Temperature, TemperatureSlope

# optax.apply_if_finite gives up and applies a non-finite update after this many in a row; never
# here: the loop stops the run instead (train.skip_nonfinite), so no state ever holds a NaN.
_NEVER = 2 ** 31 - 1


def trainable_filter(cfg):
  """The nnx filter for what `train.trainable` names."""
  if cfg.train.trainable == 'temperature':
    return Temperature
  if cfg.train.trainable == 'model+temperature':
    return nnx.Param
  return nnx.All(nnx.Param, nnx.Not(Temperature))


def warmup_steps(cfg) -> int:
  """train.warmup_steps, cut to the run's steps but one: a run shorter than its warmup (a quick try with
  --config.train.steps=20) warms up over all but its last step instead of being refused."""
  return min(cfg.train.warmup_steps, cfg.train.steps - 1)


def learning_rate_schedule(cfg, peak=None) -> optax.Schedule:
  """train.*'s warmup then cosine, to `peak` (default train.learning_rate)."""
  t = cfg.train
  peak = t.learning_rate if peak is None else peak
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps(cfg),
      decay_steps=t.steps, end_value=peak * t.final_lr_fraction)


def decays(v) -> bool:
  """Whether weight decay applies to a variable: to weight matrices (kernels and embeddings, the
  Params with an 'embed' axis) only, never to temperatures or their slopes (whatever their shape),
  norm scales or per-head position parameters."""
  if isinstance(v, Temperature) or not isinstance(v, nnx.Param):
    return False
  return 'embed' in (v.get_metadata().get('axes') or ())


def _decay_mask(params):
  return jax.tree.map(decays, params, is_leaf=lambda v: isinstance(v, nnx.Variable))


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
  """AdamW over the trainable partition, inside optax.apply_if_finite: an update whose gradient is
  not finite is skipped (weights and optimizer state, schedule count included, stay as they were),
  and the state counts such updates (skipped_updates), so the counts resume with the checkpoint."""
  t = cfg.train
  tx = _adamw(cfg, t.learning_rate, t.weight_decay, t.clip_norm, _decay_mask)
  if t.trainable == 'model+temperature':
    # Two partitions, each clipped by its own global norm, with its own rate and decay: the few
    # temperatures would otherwise be clipped by the weights' gradient norm and move at their rate.
    # Their decay (default 0) pulls every temperature toward 0, vectors included.
    temperatures = _adamw(cfg, t.temperature.learning_rate, t.temperature.weight_decay, t.temperature.clip_norm, None)
    tx = optax.multi_transform({'model': tx, 'temperature': temperatures}, partition_labels)
  return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER)


def skipped_updates(opt_state) -> dict:
  """{'nonfinite_in_a_row', 'skipped_updates'}: the non-finite updates skipped in a row up to the
  last one, and in all since the optimizer was made (both kept in its state)."""
  return {'nonfinite_in_a_row': opt_state.notfinite_count, 'skipped_updates': opt_state.total_notfinite}


def applied_learning_rate(cfg, opt_state):
  """The weights' learning rate the next update applies: train.learning_rate's schedule at the
  schedule's own count in `opt_state` (updates applied, skipped ones not counted), not at the step."""
  state = opt_state.inner_state
  if hasattr(state, 'inner_states'):  # model+temperature: the weights' partition.
    state = state.inner_states['model']
  is_schedule = lambda s: isinstance(s, optax.ScaleByScheduleState)
  count = next(s.count for s in jax.tree.leaves(state, is_leaf=is_schedule) if is_schedule(s))
  return learning_rate_schedule(cfg)(count)


def min_temperature(cfg) -> float:
  """search.min_temperature as a bound on the stored temperature: the multiplier itself, or for the
  ssmax schedule (multiplier s_h ln i) its s_h, bounded so the multiplier at i = L is at least it."""
  if cfg.model.temperature_schedule == 'ssmax':
    return cfg.search.min_temperature / math.log(config.temperature_length(cfg))
  return cfg.search.min_temperature


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
