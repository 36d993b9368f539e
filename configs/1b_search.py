"""The paper's head-temperature search of the 1B NoPE model at 8K (docs/method.md, section 3).

704 temperatures (22 layers x 32 heads) train from 1.6, the best uniform value at 8K, while the
1.1B weights stay frozen: AdamW (0.9, 0.95), no weight decay, clip 1.0, lr 0.1, 200 steps of
8 x 8192 tokens (13M tokens), 10% warmup then cosine to 0.01, c_h >= 1 after every step.

  python -m nopejax.train --config configs/1b_search.py --workdir gs://BUCKET/runs/nope-1b-search8k \
      --config.search.base=gs://BUCKET/runs/nope-1b \
      --config.data.train_files=gs://BUCKET/tokens/train --config.data.eval_files=gs://BUCKET/tokens/eval \
      --config.data.tokenizer=gs://BUCKET/llama2.model

On a TPU v5e-8 it fits up to 8 x 65536 tokens (`python -m nopejax.plan --config configs/1b_search.py
--topology v5e-8 --config.data.seq_len=65536`).
"""
import pathlib

from nopejax import config


def get_config():
  cfg = config.search_recipe(config.from_file(pathlib.Path(__file__).with_name('1b.py')))
  cfg.data.seq_len = 8192
  cfg.train.log_every = 10
  cfg.train.eval_every = 50
  cfg.train.checkpoint_every = 50
  cfg.search.init = '1.6'  # The best uniform temperature at 8K.
  # The float32 logits 2048 positions at a time, never the whole window's: 2048 divides every search length.
  cfg.train.loss_chunk = 2048
  # The layers' inputs in host memory (704 MiB per chip at 8 x 8192 on v5e-8, 5.5 GiB at 8 x 65536):
  # the copies grow with the length, attention's work with its square.
  cfg.model.remat = 'offload'
  return cfg
