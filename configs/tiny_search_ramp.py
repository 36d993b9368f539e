"""Temperature search for the tiny model, a learned ramp per head past L that keeps it exactly the
base model within L.

configs/tiny_search_mix.py with a slope per octave past L = 64 (model.temperature_octaves=4:
L-2L, 2L-4L, 4L-8L, beyond 8L; a ramp piecewise linear in ln i) and 8L listed twice in
search.lengths (the loss counts windows of 8L twice).

  python -m nopejax.train --config configs/tiny_search_ramp.py --workdir runs/tiny_search_ramp \
      --config.search.base=runs/tiny
"""
import pathlib

from nopejax import config


def get_config():
  cfg = config.from_file(pathlib.Path(__file__).with_name('tiny_search_mix.py'))
  cfg.model.temperature_octaves = 4
  cfg.search.lengths = (2 * 64, 4 * 64, 8 * 64, 8 * 64, 16 * 64)
  return cfg
