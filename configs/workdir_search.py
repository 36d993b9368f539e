"""The paper's temperature search (config.search_recipe) for the model in a workdir, at 4x the
length it was trained at, starting from the best uniform temperature (search.init='auto').
Pass the workdir of the model after a colon; it becomes search.base.

  python -m nopejax.train --config configs/workdir_search.py:runs/tinyllama-nope --workdir runs/tinyllama-nope-search \
      --config.data.dataset=textdir --config.data.text_dir=/data/slimpajama
"""
import os

from nopejax import config


def get_config(workdir):
  cfg = config.search_recipe(config.load_json(os.path.join(workdir, 'config.json')))
  cfg.search.base = workdir
  cfg.search.init = 'auto'
  cfg.data.seq_len *= 4
  return cfg
