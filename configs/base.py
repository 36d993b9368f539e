"""Every key at its default (nopejax/defaults.py declares them), to set from the command line.

  python -m nopejax.train --config configs/base.py --workdir runs/base --config.train.steps=100
"""
from nopejax import config


def get_config():
  return config.get_config()
