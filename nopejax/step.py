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
from nopejax import loss as loss_lib
from nopejax.model import Transformer

cross_entropy = loss_lib.cross_entropy


def head_inputs(model, x_BxTxD):
  """What Transformer.head multiplies, for loss_lib.chunked_cross_entropy: the final-normed states
  and the output projection [D, V], both in the model's dtype (head(x) = their product, in float32)."""
  w_DxV = model.embed_VxD[...].T if model.tie_embeddings else model.head_DxV[...]
  return model.final_norm(x_BxTxD), w_DxV.astype(model.dtype)


def loss_sums(cfg, model, batch):
  """(sum of next-token losses, token count) of a batch; with train.loss_chunk, the logits and
  their gradient train.loss_chunk positions at a time, never for the whole batch."""
  x_BxTxD = model.hidden(batch['inputs'], _segments(cfg, batch), batch['positions'])
  chunk = min(cfg.train.loss_chunk, x_BxTxD.shape[1])
  if chunk:
    total = loss_lib.chunked_cross_entropy(*head_inputs(model, x_BxTxD), batch['targets'], batch['loss_mask'], chunk,
                                           cfg.mesh.rules)
    return total, jnp.sum(batch['loss_mask'])
  return cross_entropy(model.head(x_BxTxD), batch['targets'], batch['loss_mask'])


def whole_embedding(params, rules):
  """`params` with a trained embedding table gathered whole along its width (vocab split as before).

  Looked up from a table split over its width, the lookup's gradient sends every token of the
  global batch to every device, as a [tokens, D / devices] float32 array that TPU tiling pads to
  128 lanes. Gathered first, each device adds its own tokens' rows into a whole table's gradient,
  which is reduce-scattered once, as the other weights' gradients are.
  """
  def gather(path, variable):
    if getattr(path[-1], 'key', None) != 'embed_VxD':
      return variable
    return variable.replace(sharding.constrain(variable[...], ('vocab', None), rules))

  return jax.tree_util.tree_map_with_path(gather, params, is_leaf=lambda v: isinstance(v, nnx.Variable))


def length_weights(mask_BxT, lengths):
  """Per-token weights w such that sum(loss * w) is the mean over target lengths n of the mean loss
  of the windows' first n tokens (lengths = (T,): the plain mean over unmasked tokens).

  A window's first n tokens are a window of n tokens (attention is causal and packed documents
  restart their positions), so one batch at the longest length trains every shorter one too. As
  weights on the tokens, the mix goes through microbatches and loss chunks unchanged.
  """
  weight_T = jnp.zeros(mask_BxT.shape[1], jnp.float32)
  for n in lengths:
    first_n_T = (jnp.arange(mask_BxT.shape[1]) < n).astype(jnp.float32)
    weight_T += first_n_T / jnp.maximum(jnp.sum(mask_BxT * first_n_T), 1.0)
  return mask_BxT * weight_T / len(lengths)


def _segments(cfg, batch):
  """Segment ids keep packed documents apart; batch['positions'] restart at each document then."""
  return batch['segment_ids'] if cfg.data.separate_documents else None


def make_train_step(cfg, graphdef, tx):
  """Returns train_step(state, batch) -> (state, metrics), to be jitted by the caller."""
  clamp = cfg.train.trainable == 'temperature'
  lengths = config.search_lengths(cfg)  # (data.seq_len,) unless search.lengths mixes several.

  microbatches = cfg.train.microbatches

  def loss_fn(params, frozen, batch):
    """The batch's loss weighted per token (length_weights): summed over microbatches, the whole mean."""
    return loss_sums(cfg, nnx.merge(graphdef, whole_embedding(params, cfg.mesh.rules), frozen), batch)[0]

  def loss_and_grads(params, frozen, batch):
    # Weights from the whole batch, so microbatches add up to exactly the whole batch's loss.
    batch = dict(batch, loss_mask=length_weights(batch['loss_mask'], lengths))
    if microbatches == 1:
      return jax.value_and_grad(loss_fn)(params, frozen, batch)

    # Microbatch i is rows i, i + k, i + 2k, ...: each device keeps its own rows, nothing moves.
    def slices(a_BxT):
      return a_BxT.reshape(a_BxT.shape[0] // microbatches, microbatches, *a_BxT.shape[1:]).swapaxes(0, 1)

    def accumulate(sums, microbatch):
      microbatch = {k: sharding.constrain(v, ('batch', 'seq'), cfg.mesh.rules) for k, v in microbatch.items()}
      loss, grads = jax.value_and_grad(loss_fn)(params, frozen, microbatch)
      return jax.tree.map(jnp.add, sums, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, jax.tree.map(slices, batch))
    return loss, grads

  def train_step(state, batch):
    loss, grads = loss_and_grads(state['params'], state['frozen'], batch)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient leaves weights and optimizer state as they were (the optimizer
    # skips it: optim.make_optimizer), so no state ever holds a NaN and no checkpoint can; the loop
    # stops or skips (train.skip_nonfinite). A non-finite loss counts as a non-finite gradient.
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
    updates, opt = tx.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    if clamp:
      params = optim.clamp_temperatures(params, optim.min_temperature(cfg), config.search_min_slope(cfg),
                                        cfg.search.share_slopes)
    metrics = {
        'loss': loss,
        'grad_norm': grad_norm,
        'learning_rate': optim.applied_learning_rate(cfg, state['opt']),  # Skipped updates do not count.
        **optim.skipped_updates(opt),
    }
    return dict(state, step=state['step'] + 1, params=params, opt=opt), metrics

  return train_step


def make_eval_step(cfg, graphdef):
  """Returns eval_step(params, frozen, batch) -> (loss sum, token count)."""

  def eval_step(params, frozen, batch):
    return loss_sums(cfg, nnx.merge(graphdef, params, frozen), batch)

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
  if cfg.mesh.shard_optimizer:
    shardings['opt'] = sharding.split_over(shardings['opt'], shapes['opt'], 'data')
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
