"""The best search found for the tiny model that keeps it exactly the base model within L (issue 13).

configs/tiny_search_mix.py with a slope per octave past L = 64 (model.temperature_octaves=4:
L-2L, 2L-4L, 4L-8L, beyond 8L; a ramp piecewise linear in ln i) and 8L listed twice in
search.lengths. Against the constant search at 16L (200 steps each), it is ahead at L-2L and 2L-4L
in most seeds, level at 8L-16L and behind at 4L-8L over five seeds (README, issue 13).

  python -m nopejax.train --config configs/tiny_search_ramp.py --workdir runs/tiny_search_ramp \
      --config.search.base=runs/tiny
"""
from configs import tiny_search_mix


def get_config():
  cfg = tiny_search_mix.get_config()
  cfg.model.temperature_octaves = 4
  cfg.search.lengths = (2 * 64, 4 * 64, 8 * 64, 8 * 64, 16 * 64)
  return cfg
