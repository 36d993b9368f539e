"""Temperature search for the tiny model at 4x its pretraining length (64 -> 256 bytes).

Only the 4 x 4 per-head temperatures train; every weight of the base run stays frozen.
The paper's recipe (docs/method.md, section 3) scaled to the tiny model; init='auto' starts from the
best uniform temperature for length 256, found by a sweep on validation data.

  python -m nopejax.train --config configs/tiny_search.py --workdir runs/tiny_search \
      --config.search.base=runs/tiny
"""
import pathlib

from nopejax import config


def get_config():
  cfg = config.search_recipe(config.from_file(pathlib.Path(__file__).with_name('tiny.py')))
  cfg.data.seq_len = 4 * 64
  cfg.train.log_every = 20
  cfg.train.eval_every = 100
  cfg.train.checkpoint_every = 100
  cfg.search.init = 'auto'
  return cfg
