"""What trains and how: the trainable partition (model weights or temperatures), AdamW, schedule, clamp.

Pretraining and the temperature search share this code path. The model state is split into a
trainable partition and a frozen one; the optimizer only ever sees the trainable partition, so the
frozen one has no optimizer state, no gradient, and no part in gradient clipping.
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nopejax.model import Temperature


def trainable_filter(cfg):
  """The nnx filter for what `train.trainable` names."""
  if cfg.train.trainable == 'temperature':
    return Temperature
  return nnx.All(nnx.Param, nnx.Not(Temperature))


def learning_rate_schedule(cfg) -> optax.Schedule:
  t = cfg.train
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=t.steps, end_value=t.learning_rate * t.final_lr_fraction)


def _decay_mask(params):
  # Decay matrices only: norms' scales and temperatures are vectors and stay undecayed.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
  t = cfg.train
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm),
      optax.adamw(learning_rate_schedule(cfg), b1=t.b1, b2=t.b2, eps=t.eps,
                  weight_decay=t.weight_decay, mask=_decay_mask),
  )


def clamp_temperatures(params, minimum: float):
  """Projects every temperature in `params` onto c >= minimum (the paper's focus constraint)."""
  def clamp(v):
    return v.replace(jnp.maximum(v[...], minimum)) if isinstance(v, Temperature) else v
  return jax.tree.map(clamp, params, is_leaf=lambda v: isinstance(v, nnx.Variable))
