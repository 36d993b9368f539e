"""The tiny model pretrained with temperatures that train along with the weights.

The weights train as in configs/tiny.py; the per-head temperatures form a second optimizer
partition (train.temperature.*). The schedule is overridable: 'constant' (c_h), 'ssmax'
(s_h ln i) or 'log' (1 up to model.temperature_length, c_h + a_h ln(i / L) beyond; within a
64-token window it learns only if L < 64, hence L = 16 here).

  python -m nopejax.train --config configs/tiny_learned_temperature.py --workdir runs/tiny_lt_log \
      --config.model.temperature_schedule=log
"""
import pathlib

from nopejax import config


def get_config():
  cfg = config.from_file(pathlib.Path(__file__).with_name('tiny.py'))
  cfg.train.trainable = 'model+temperature'
  cfg.model.temperature_schedule = 'log'
  cfg.model.temperature_length = 16
  cfg.train.temperature.learning_rate = 1e-2
  cfg.train.temperature.weight_decay = 0.0
  cfg.train.temperature.clip_norm = 1.0
  return cfg
