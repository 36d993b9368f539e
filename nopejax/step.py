"""The jitted computations of a step: loss, gradient over the trainable partition, update, evaluation.

The train state is a dict {'step', 'params', 'frozen', 'opt'}: 'params' is the trainable
partition of the model (weights when pretraining, temperatures in the search), 'frozen' the rest.
`jax.grad` runs over 'params' alone, so in the search XLA never forms a weight gradient.
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nopejax import config, data, optim, sharding
from nopejax.model import Transformer


def cross_entropy(logits_BxTxV, targets_BxT, mask_BxT):
  """Sum of next-token losses where mask is 1, and the number of those tokens."""
  losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  return jnp.sum(losses_BxT * mask_BxT), jnp.sum(mask_BxT)


def mean_over_lengths(losses_BxT, mask_BxT, lengths):
  """Mean over target lengths n of the mean loss of the windows' first n tokens.

  A window's first n tokens are a window of n tokens (attention is causal and packed documents
  restart their positions), so one batch at the longest length trains every shorter one too.
  """
  per_length = []
  for n in lengths:
    loss_sum, count = jnp.sum(losses_BxT[:, :n] * mask_BxT[:, :n]), jnp.sum(mask_BxT[:, :n])
    per_length.append(loss_sum / jnp.maximum(count, 1.0))
  return sum(per_length) / len(per_length)


def _segments(cfg, batch):
  """Segment ids keep packed documents apart; batch['positions'] restart at each document then."""
  return batch['segment_ids'] if cfg.data.separate_documents else None


def make_train_step(cfg, graphdef, tx):
  """Returns train_step(state, batch) -> (state, metrics), to be jitted by the caller."""
  schedule = optim.learning_rate_schedule(cfg)
  clamp = cfg.train.trainable == 'temperature'
  lengths = config.search_lengths(cfg)  # (data.seq_len,) unless search.lengths mixes several.

  def loss_fn(params, frozen, batch):
    model = nnx.merge(graphdef, params, frozen)
    logits_BxTxV = model(batch['inputs'], _segments(cfg, batch), batch['positions'])
    losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch['targets'])
    return mean_over_lengths(losses_BxT, batch['loss_mask'], lengths)

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], state['frozen'], batch)
    grad_norm = optax.tree.norm(grads)
    updates, opt = tx.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    if clamp:
      params = optim.clamp_temperatures(params, cfg.search.min_temperature)
    # A non-finite loss or gradient leaves weights and optimizer state as they were, so no state
    # ever holds a NaN and no checkpoint can; the loop stops or skips (train.skip_nonfinite).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt),
                               (state['params'], state['opt']))
    metrics = {
        'loss': loss,
        'grad_norm': grad_norm,
        'learning_rate': schedule(state['step']),
        'nonfinite': 1 - finite.astype(jnp.int32),
    }
    return dict(state, step=state['step'] + 1, params=params, opt=opt), metrics

  return train_step


def make_eval_step(cfg, graphdef):
  """Returns eval_step(params, frozen, batch) -> (loss sum, token count)."""

  def eval_step(params, frozen, batch):
    model = nnx.merge(graphdef, params, frozen)
    logits_BxTxV = model(batch['inputs'], _segments(cfg, batch), batch['positions'])
    return cross_entropy(logits_BxTxV, batch['targets'], batch['loss_mask'])

  return eval_step


def mean_eval_loss(cfg, eval_step, params, frozen, batch_sharding) -> float:
  """Mean next-token loss over the fixed validation batches (train.eval_batches of data.eval_split)."""
  loss_sum, count = 0.0, 0.0
  rows = sharding.process_rows(batch_sharding, cfg.train.batch_size)
  for batch in data.eval_iterator(cfg, cfg.data.eval_split, cfg.train.eval_batches, rows):
    batch_sum, batch_count = eval_step(params, frozen, data.global_batch(batch, batch_sharding, cfg.train.batch_size))
    # Reading back every batch keeps few collectives queued (XLA:CPU hangs with ~30 queued).
    loss_sum, count = loss_sum + float(batch_sum), count + float(batch_count)
  return loss_sum / max(count, 1.0)


def _init_fn(cfg, tx):
  def init():
    model = Transformer(cfg, nnx.Rngs(cfg.train.seed))
    _, params, frozen = nnx.split(model, optim.trainable_filter(cfg), ...)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'frozen': frozen, 'opt': tx.init(params)}
  return init


def abstract_state(cfg, mesh, tx):
  """(graphdef, state, shardings) with no memory used: every leaf a ShapeDtypeStruct carrying its sharding."""
  graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), optim.trainable_filter(cfg), ...)
  shapes = jax.eval_shape(_init_fn(cfg, tx))
  shardings = sharding.state_shardings(shapes, mesh, cfg.mesh.rules)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return graphdef, state, shardings


def init_state(cfg, shardings, tx):
  """A freshly initialized train state, created directly in its sharded layout."""
  return jax.jit(_init_fn(cfg, tx), out_shardings=shardings)()


def model_state(state):
  """The whole model's state (both partitions) of a train state."""
  return nnx.merge_state(state['params'], state['frozen'])


def split_model_state(cfg, graphdef, model_state_):
  """Inverse of model_state: (params, frozen) for `train.trainable`."""
  _, params, frozen = nnx.split(nnx.merge(graphdef, model_state_), optim.trainable_filter(cfg), ...)
  return params, frozen
