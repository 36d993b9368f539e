"""Temperature search for the tiny model at 4x its pretraining length (64 -> 256 bytes).

Only the 4 x 4 per-head temperatures train; every weight of the base run stays frozen.
The paper's recipe (method.md, section 3) scaled to the tiny model; init='auto' starts from the
best uniform temperature for length 256, found by a sweep on validation data.

  python -m nopejax.train --config configs/tiny_search.py --workdir runs/tiny_search \
      --config.search.base=runs/tiny
"""
from configs import tiny


def get_config():
  cfg = tiny.get_config()
  cfg.data.seq_len = 4 * 64
  cfg.train.trainable = 'temperature'
  cfg.train.steps = 200
  cfg.train.batch_size = 8
  cfg.train.learning_rate = 0.1
  cfg.train.warmup_steps = 20  # 10% linear warmup, then cosine to 0.1 x lr.
  cfg.train.final_lr_fraction = 0.1
  cfg.train.b1 = 0.9
  cfg.train.b2 = 0.95
  cfg.train.weight_decay = 0.0
  cfg.train.clip_norm = 1.0
  cfg.train.log_every = 20
  cfg.train.eval_every = 100
  cfg.train.checkpoint_every = 100
  cfg.search.init = 'auto'
  cfg.search.min_temperature = 1.0
  return cfg
