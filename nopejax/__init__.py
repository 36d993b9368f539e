"""nopejax: pretrain NoPE transformers on a device mesh, search per-head temperatures, evaluate length generalization."""


def load(workdir):
  """Returns `(model, config)` for any workdir nopejax writes: the latest checkpoint's model."""
  from nopejax import checkpoint  # Imported here so `import nopejax` stays light.
  return checkpoint.load(workdir)
