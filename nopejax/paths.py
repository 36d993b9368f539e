"""Paths that may be URLs: workdirs, data and outputs go through etils.epath, never os.path.

`gs://` (and `s3://`, `az://`, `hf://`) work wherever a local path does: orbax writes checkpoints
there through tensorstore, and everything else goes through epath (fsspec's gcsfs for gs:// when
tensorflow is absent). os.path would turn `gs://bucket/run` into a local directory named `gs:`.
"""
import os

from etils import epath


def is_url(path) -> bool:
  return '://' in os.fspath(path)


def resolve(path) -> epath.Path:
  """A local path made absolute, or a URL as it is (epath's resolve() would make it local)."""
  return epath.Path(path) if is_url(path) else epath.Path(os.path.abspath(os.fspath(path)))


def write_text(path, text: str) -> None:
  """Writes a whole file, creating its directory (a no-op on object stores)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def copy_tree(source, destination) -> None:
  """Copies every file under `source` to the same relative place under `destination` (any URLs)."""
  source, destination = epath.Path(source), epath.Path(destination)
  for entry in source.iterdir():
    if entry.is_dir():
      copy_tree(entry, destination / entry.name)
    else:
      (destination / entry.name).parent.mkdir(parents=True, exist_ok=True)
      entry.copy(destination / entry.name, overwrite=True)

