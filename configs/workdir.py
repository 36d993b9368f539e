"""The config a workdir holds (its config.json), to train further there: a model converted from
Hugging Face by `python -m nopejax.convert from-hf`, or any run. Pass the workdir after a colon.

  python -m nopejax.train --config configs/workdir.py:runs/tinyllama-nope --workdir runs/tinyllama-nope \
      --config.data.dataset=textdir --config.data.text_dir=/data/slimpajama --config.train.steps=1000
"""
import os

from nopejax import config


def get_config(workdir):
  return config.load_json(os.path.join(workdir, 'config.json'))
