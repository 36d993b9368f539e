"""Tiny byte-level NoPE model on the bundled corpus (the Python standard library): the CPU default.

Long enough in training (2000 steps at length 64) that the paper's picture shows: loss climbs past
the training length and a temperature c > 1 brings it down (docs/method.md, section 8).

  python -m nopejax.train --config configs/tiny.py --workdir runs/tiny
"""
from nopejax import config


def get_config():
  cfg = config.get_config()
  cfg.model.vocab_size = 256
  cfg.model.num_layers = 4
  cfg.model.embed_dim = 128
  cfg.model.num_heads = 4
  cfg.model.num_kv_heads = 4
  cfg.model.mlp_dim = 384
  cfg.data.dataset = 'pystdlib'
  cfg.data.tokenizer = 'byte'
  cfg.data.seq_len = 64
  cfg.train.steps = 2000
  cfg.train.batch_size = 32
  cfg.train.learning_rate = 2e-3
  cfg.train.warmup_steps = 100
  cfg.train.final_lr_fraction = 0.1
  cfg.train.weight_decay = 0.1
  cfg.train.log_every = 100
  cfg.train.eval_every = 500
  cfg.train.checkpoint_every = 500
  # Evaluation at 64 ... 1024: 128 windows per length, each scoring its last 32 tokens, keep
  # the three evaluations of `make demo` to about a minute each on 2 cores.
  cfg.eval.stride = 32
  cfg.eval.max_tokens = 4096
  return cfg
