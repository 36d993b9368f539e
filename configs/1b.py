"""The paper's model and recipe: TinyLlama-1.1B with RoPE removed (NoPE), 50K steps x 2M tokens.

22 layers, width 2048, 32 query heads over 4 kv heads, SwiGLU 5632, vocab 32000, context 2048:
1,100,048,384 parameters plus 704 temperatures. Data: SlimPajama (no GitHub) + StarCoderdata 7:3,
their shards read in place (SlimPajama's .jsonl.zst, StarCoderData's .parquet), tokenized with the
Llama-2 SentencePiece model.

  python -m nopejax.train --config configs/1b.py --workdir gs://BUCKET/runs/nope-1b \
      --config.data.train_files='gs://BUCKET/SlimPajama-627B/train/chunk*/*.jsonl.zst,gs://BUCKET/starcoderdata/*/train-*.parquet' \
      --config.data.eval_files='gs://BUCKET/SlimPajama-627B/validation/chunk1/*.jsonl.zst' \
      --config.data.tokenizer=gs://BUCKET/llama2.model

Or tokenize once, on 100 Dataflow workers (pip install 'nopejax[dataflow]'; pip wheel --no-deps -w dist .;
again with --split eval, data.eval_files and --out gs://BUCKET/tokens/eval), and train on the token shards:

  python -m nopejax.prepare --config configs/1b.py --config.data.tokenizer=gs://BUCKET/llama2.model \
      --config.data.train_files='gs://BUCKET/SlimPajama-627B/train/chunk*/*.jsonl.zst,gs://BUCKET/starcoderdata/*/train-*.parquet' \
      --out gs://BUCKET/tokens/train -- --runner=DataflowRunner --project=PROJECT --region=REGION \
      --temp_location=gs://BUCKET/tmp --machine_type=n2-standard-4 --num_workers=100 \
      --extra_package=dist/nopejax-0.1.0-py3-none-any.whl
  python -m nopejax.train --config configs/1b.py --workdir gs://BUCKET/runs/nope-1b \
      --config.data.train_files=gs://BUCKET/tokens/train --config.data.eval_files=gs://BUCKET/tokens/eval \
      --config.data.tokenizer=gs://BUCKET/llama2.model
  python -m nopejax.train --config configs/1b.py --dry_run   # size and bytes per device, no memory
  python -m nopejax.plan --config configs/1b.py --topology v5e-256   # compiles for the slice here: fits?
"""
from nopejax import config


def get_config():
  cfg = config.get_config()
  cfg.model.vocab_size = 32000
  cfg.model.num_layers = 22
  cfg.model.embed_dim = 2048
  cfg.model.num_heads = 32
  cfg.model.num_kv_heads = 4
  cfg.model.head_dim = 64
  cfg.model.mlp_dim = 5632
  cfg.model.norm_eps = 1e-5
  cfg.model.dtype = 'bfloat16'
  # Recompute each block in the backward pass from its input, the one array kept per layer (704 MiB
  # per chip on v5e-256). --config.model.remat=offload keeps those in host memory instead: what lets
  # the 1B fit smaller slices and larger batches (docs/scaling.md).
  cfg.model.remat = 'full'
  cfg.model.scan_layers = True
  cfg.data.dataset = 'files'  # data.train_files / data.eval_files on the command line (above).
  cfg.data.text_key = 'text,content'  # SlimPajama's field, StarCoderData's column.
  cfg.data.tokenizer = 'llama2.model'
  cfg.data.seq_len = 2048
  cfg.data.separate_documents = False  # TinyLlama's packing let documents see each other.
  cfg.train.steps = 50_000
  cfg.train.batch_size = 1024  # x 2048 tokens = 2.1M tokens per step.
  # Logits and their gradient 512 positions at a time (loss.chunked_cross_entropy), never the whole batch's.
  cfg.train.loss_chunk = 512
  cfg.train.learning_rate = 3.5e-4
  cfg.train.warmup_steps = 2000
  cfg.train.final_lr_fraction = 4e-5 / 3.5e-4  # Cosine to 4e-5.
  cfg.train.b1 = 0.9
  cfg.train.b2 = 0.95
  cfg.train.weight_decay = 0.1
  cfg.train.clip_norm = 1.0
  cfg.train.log_every = 10
  cfg.train.eval_every = 1000
  cfg.train.eval_batches = 16
  cfg.train.checkpoint_every = 1000
  cfg.mesh.data = 1
  cfg.mesh.fsdp = -1
  cfg.mesh.tensor = 1
  return cfg
