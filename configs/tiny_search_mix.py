"""Temperature search for the tiny model over a mix of target lengths, 2L to 16L.

Windows of 16 x 64 = 1024 bytes; the loss averages the mean loss of each window's first 128,
256, 512 and 1024 bytes (search.lengths), so one search serves every length up to 16L. The
schedule is 'log': the base model's temperature 1 up to L = 64 (model.temperature_length, the
pretraining length), c_h + a_h ln(i / L) beyond, both per head.

  python -m nopejax.train --config configs/tiny_search_mix.py --workdir runs/tiny_search_mix \
      --config.search.base=runs/tiny
"""
import pathlib

from nopejax import config


def get_config():
  cfg = config.search_recipe(config.from_file(pathlib.Path(__file__).with_name('tiny.py')))
  cfg.data.seq_len = 16 * 64
  cfg.search.lengths = (2 * 64, 4 * 64, 8 * 64, 16 * 64)
  cfg.model.temperature_schedule = 'log'
  cfg.model.temperature_length = 64
  cfg.train.log_every = 20
  cfg.train.eval_every = 100
  cfg.train.checkpoint_every = 100
  cfg.search.init = '1.0'
  return cfg
