"""nopejax: pretrain NoPE transformers on a device mesh, search per-head temperatures, evaluate length generalization."""


def load(workdir, temperature=None):
  """Returns `(model, config)` for any workdir nopejax writes: the latest checkpoint's model.

  `model(tokens_BxT)` gives float32 logits [B, T, vocab]. `temperature=1.5` sets every head's
  temperature to that uniform value (the zero-shot scaling), whatever the checkpoint holds.
  """
  from nopejax import checkpoint  # Imported here so `import nopejax` stays light.
  return checkpoint.load(workdir, temperature)
