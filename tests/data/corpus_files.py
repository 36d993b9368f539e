"""Configs and corpus folders the data tests build."""
import pathlib

from nopejax import config


def make_cfg(tfds_dir, **data_values):
  cfg = config.get_config()
  cfg.data.tfds_dir = tfds_dir
  for key, value in data_values.items():
    setattr(cfg.data, key, value)
  return cfg


def write_files(root: pathlib.Path, files: dict) -> str:
  for name, text in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
      (root / name).write_bytes(text)
    else:
      (root / name).write_text(text)
  return str(root)
