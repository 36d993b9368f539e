"""Every config key nopejax reads, with its default; `nopejax.config.get_config()` returns them.

Experiment configs (configs/*.py) start from `get_config()` and change values; they cannot add
keys (the returned ConfigDict is locked), so a typo fails loudly instead of being ignored. Every
numeric key's range is in nopejax/config_checks.py.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()

  # Model: a Llama-style decoder without position encoding.
  cfg.model = ml_collections.ConfigDict()
  cfg.model.vocab_size = 256
  cfg.model.num_layers = 4
  cfg.model.embed_dim = 128
  cfg.model.num_heads = 4
  cfg.model.num_kv_heads = 4  # < num_heads for grouped-query attention.
  cfg.model.head_dim = 0  # 0 = embed_dim // num_heads.
  cfg.model.mlp_dim = 384  # SwiGLU hidden width.
  cfg.model.norm_eps = 1e-5
  cfg.model.init_std = 0.02
  # 'nope' (none), 'rope' (rotary, Llama's rotate-half layout), 'alibi' (bias -m_h (i - j)) or 'kerple'
  # (KERPLE-log, learned bias -r1_h ln(1 + r2_h (i - j))).
  cfg.model.position = 'nope'
  # Position per layer (a hybrid), with model.position='rope': '' = every layer as model.position; 'every:N' = RoPE on
  # all but every N-th layer (layers N-1, 2N-1, ... are NoPE: SmolLM3's pattern with N = 4); or one 0/1 per layer,
  # '1,1,1,0' (1 = RoPE). NoPE layers get neither the rotation nor YaRN's factor; temperatures act on every layer.
  cfg.model.rope_layers = ''
  cfg.model.rope_theta = 10000.0  # RoPE base b: dims pair m turns by position * b^(-2m / head_dim).
  # RoPE scaling for lengths past original_length L (docs/pe_methods.md): 'none', 'linear' (position
  # interpolation), 'ntk', 'dynamic' (dynamic NTK), 'yarn' (with its attention factor) or 'llama3'.
  cfg.model.rope_scaling = 'none'
  cfg.model.rope_scaling_factor = 1.0  # s; 0 = each forward's own length / L (zero-shot at every evaluated length).
  cfg.model.original_length = 0  # L that rope_scaling and logn refer to; 0 = data.seq_len.
  cfg.model.yarn_beta_fast = 32.0  # YaRN: dims turning more than this many times over L keep their frequency...
  cfg.model.yarn_beta_slow = 1.0  # ... fewer than this many times are interpolated by s; a ramp between.
  cfg.model.llama3_low_freq_factor = 1.0  # Llama 3: wavelengths over L / this are interpolated by s...
  cfg.model.llama3_high_freq_factor = 4.0  # ... under L / this kept; a blend between.
  cfg.model.logn = False  # Log-n scaling: q_i *= max(1, ln(i + 1) / ln L), with any position encoding.
  cfg.model.llama4_scaling = False  # Llama 4's temperature: q_i *= 1 + llama4_attn_scale ln(floor((i + 1) / llama4_floor_scale) + 1).
  cfg.model.llama4_floor_scale = 8192.0
  cfg.model.llama4_attn_scale = 0.1
  cfg.model.tie_embeddings = False  # The output projection is the input embedding, transposed.
  cfg.model.temperature = 1.0  # Initial (or zero-shot uniform) multiplier c on q, every head.
  # How the per-head temperature varies with a query's position i (1-based, within its document):
  # 'constant' tau = c_h; 'log' tau = 1 for i <= L, c_h + a_h ln(i / L) beyond (a_h starts at 0);
  # 'ssmax' tau = s_h ln(i) (Scalable-Softmax; s_h starts at model.temperature / ln L).
  cfg.model.temperature_schedule = 'constant'
  cfg.model.temperature_length = 0  # L of the schedules; 0 = data.seq_len (a search must set its base's length).
  # 'log' only: K slopes per head, one per octave past L. tau = c_h + a_h,0 r_0 + ... + a_h,K-1 r_K-1 with
  # r_k = ln(i / L) - k ln 2 clipped to [0, ln 2] (the last unclipped above): a learned ramp, piecewise
  # linear in ln i with knots at 2L, 4L, ...; K = 1 is the log form itself.
  cfg.model.temperature_octaves = 1
  # The octaves' shape: 'ramp' (above: continuous, each octave's line starting where the last one ends) or
  # 'step' (tau = c_h + a_h,k throughout octave k, the last one out to any length: every octave's value
  # its own, so what the search sets for one octave does not pull its neighbours).
  cfg.model.temperature_octave_shape = 'ramp'
  cfg.model.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16'. Params stay float32.
  # What the backward pass recomputes of each block: 'none', 'full' (everything: least memory),
  # 'save_dots' (keeps every matmul output), 'save_dots_no_batch' (keeps the projections' and the
  # MLP's outputs, recomputes attention), 'save_qkv_proj' (keeps q, k, v) or 'offload' (as 'full',
  # the blocks' inputs kept in host memory instead of the accelerator's).
  cfg.model.remat = 'none'
  cfg.model.scan_layers = False  # Scan one block over the layers' stacked weights: compile time independent of depth.
  # Attention kernel: 'auto' (splash on TPU, cudnn on GPU where it applies, else chunked from
  # attention_chunked_from tokens and xla below), 'xla' (the reference, [T, T] logits), 'chunked'
  # (plain-JAX flash attention, memory linear in T), 'splash' (Pallas TPU) or 'cudnn' (GPU, bfloat16).
  cfg.model.attention_impl = 'auto'
  # Queries and keys per block in the chunked and splash kernels; 0 = the kernel's own choice
  # (attention.default_block: 64 for chunked on CPU, 512 otherwise).
  cfg.model.attention_block = 0
  # 'auto' without a fused kernel: chunked from this length (where it overtakes xla on CPU), xla below.
  cfg.model.attention_chunked_from = 256

  # Data: a tfds builder or shard files read in place, streamed with grain, packed into windows of seq_len tokens.
  cfg.data = ml_collections.ConfigDict()
  # 'pystdlib' (bundled), 'textdir' (a directory of .txt/.jsonl, prepared into tfds_dir on the first start)
  # or 'files' (shards read in place, nothing prepared: train_files / eval_files).
  cfg.data.dataset = 'pystdlib'
  cfg.data.text_dir = ''  # For 'textdir': the directory to read.
  # For 'files': comma-separated globs (local or gs://) of .jsonl, .jsonl.gz, .jsonl.zst, .parquet or .txt
  # shards, or a directory prepared by `python -m nopejax.prepare` (its .array_record shards and index.json).
  cfg.data.train_files = ''
  cfg.data.eval_files = ''  # The same for data.eval_split (and any split but data.train_split).
  cfg.data.open_shards = 8  # 'files': raw shards each process reads at once, their documents interleaved.
  cfg.data.shuffle_buffer = 1024  # 'files': raw shards' packed windows shuffled together per process; 0 = none.
  # 'files': skip bad records (a .jsonl line without text_key, bad JSON) and unreadable rests of shards (a bad
  # gzip/zstd frame, a truncated or deleted file), logging running counts; False stops the run at the first.
  cfg.data.skip_bad_records = False
  # For .jsonl files: the field holding the document; for .parquet, the column. 'files' also takes several names
  # separated by commas, the first one present (e.g. 'text,content' for SlimPajama's and StarCoderData's shards).
  cfg.data.text_key = 'text'
  cfg.data.tfds_dir = ''  # Where tfds writes prepared data; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  cfg.data.tokenizer = 'byte'  # 'byte' (vocab 256) or the path of a SentencePiece .model file.
  cfg.data.seq_len = 64
  cfg.data.separate_documents = True  # Packed documents do not attend to each other.
  cfg.data.shuffle_seed = 0
  cfg.data.train_split = 'train'
  cfg.data.eval_split = 'validation'
  cfg.data.worker_count = 0  # grain worker processes; 0 reads in the main process.

  # Training.
  cfg.train = ml_collections.ConfigDict()
  # 'model' (all but temperatures), 'temperature' (only them) or 'model+temperature' (both, each
  # partition with its own optimizer: train.* for the weights, train.temperature.* for the temperatures).
  cfg.train.trainable = 'model'
  cfg.train.steps = 2000  # Length of the schedule.
  cfg.train.stop_after = 0  # Stop after this step as a preemption would; 0 = run to train.steps.
  cfg.train.batch_size = 32  # Global batch, in sequences.
  cfg.train.microbatches = 1  # Gradients accumulated over this many slices of the batch in one step.
  cfg.train.loss_chunk = 0  # Cross-entropy over this many positions at a time (no [B, T, vocab] logits at once); 0 = all.
  cfg.train.learning_rate = 2e-3
  cfg.train.warmup_steps = 100
  cfg.train.final_lr_fraction = 0.1  # Cosine decays to learning_rate * final_lr_fraction.
  cfg.train.b1 = 0.9
  cfg.train.b2 = 0.95
  cfg.train.eps = 1e-8
  cfg.train.weight_decay = 0.1  # Applied to matrices only, never to norms or temperatures.
  cfg.train.clip_norm = 1.0  # Global-norm clipping, > 0: optax scales to this norm, so 0 would zero every update.
  cfg.train.seed = 0
  cfg.train.log_every = 50
  cfg.train.eval_every = 500  # 0 = no evaluation during training.
  cfg.train.eval_batches = 8
  cfg.train.checkpoint_every = 500
  cfg.train.keep_checkpoints = 3  # The newest ones; a search's base step is kept too (pinned).
  cfg.train.skip_nonfinite = 0  # 0: stop at a non-finite loss or gradient; N: skip such updates, stop after N in a row.
  cfg.train.peak_flops_per_device = 0.0  # For MFU; 0 = look up the device kind (no MFU where it is unknown, e.g. on CPU).
  # The temperatures' partition under trainable='model+temperature': AdamW with the weights' betas,
  # warmup and cosine shape, but its own peak rate, weight decay and clipping norm.
  cfg.train.temperature = ml_collections.ConfigDict()
  cfg.train.temperature.learning_rate = 1e-2
  cfg.train.temperature.weight_decay = 0.0
  cfg.train.temperature.clip_norm = 1.0

  # Device mesh: each size is a device count, -1 = whatever the others leave.
  cfg.mesh = ml_collections.ConfigDict()
  cfg.mesh.data = -1
  cfg.mesh.fsdp = 1
  cfg.mesh.tensor = 1
  # ZeRO-1: the optimizer state also split over the data axis, so each device updates and holds
  # 1/data of it.
  cfg.mesh.shard_optimizer = True
  # Logical axis name -> mesh axes. Parameters and activations name their axes logically.
  cfg.mesh.rules = (
      ('batch', ('data', 'fsdp')),
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('head_dim', None),
      ('mlp', 'tensor'),
      ('norm', None),
      ('temperature', None),
      ('seq', None),
      ('act_embed', None),
      ('layers', None),  # The stacked weights' layer axis under model.scan_layers.
  )

  # Temperature search (train.trainable = 'temperature').
  cfg.search = ml_collections.ConfigDict()
  cfg.search.base = ''  # Workdir of the pretrained model whose weights are frozen.
  cfg.search.init = '1.0'  # Every temperature's start: a number, or 'auto' for the best uniform c.
  # A warm start: a finished search's workdir (or its temperatures.json) whose per-layer, per-head c_h
  # (and a_h, for a log search from a log search) start this search in place of search.init; '' = off.
  cfg.search.init_from = ''
  cfg.search.min_temperature = 1.0  # Projection after each update: c_h >= this.
  # Projection of the log schedule's slopes after each update: a_h >= this (a number as a string, e.g.
  # '0' keeps every temperature >= c_h past L); '' leaves them free.
  cfg.search.min_slope = ''
  # True: one slope per layer, its heads' mean after each update (a per-layer share of the log schedule's a_h).
  cfg.search.share_slopes = False
  cfg.search.init_candidates = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.5)  # Uniform values tried by init='auto'.
  # Target lengths searched together, each <= data.seq_len: the loss is the mean over lengths n of the
  # mean loss of each window's first n tokens (= a window of n tokens); () = data.seq_len alone.
  # A length listed twice weighs twice.
  cfg.search.lengths = ()

  # Length-generalization evaluation (python -m nopejax.evaluate).
  cfg.eval = ml_collections.ConfigDict()
  cfg.eval.lengths = ()  # Window lengths n; () = 1, 2, 4, 8 and 16 x the pretraining data.seq_len.
  cfg.eval.stride = 0  # Sliding-window stride (tokens scored per window); 0 = min(256, pretraining length / 4).
  cfg.eval.max_tokens = 65536  # Scored tokens per length, at most.
  cfg.eval.split = 'test'
  cfg.eval.batch_size = 8  # Windows per forward pass.
  cfg.eval.query_chunk = 256  # Queries per attention chunk on the long-context path.
  cfg.eval.passkey_depths = 10  # 0%, 10%, ..., 90%.
  cfg.eval.passkey_keys = 5  # Random keys per depth and length.
  cfg.eval.entropy_documents = 16  # Documents averaged for the attention entropy curves.
  cfg.eval.position_documents = 32  # Documents averaged for the loss-by-position curve.
  cfg.eval.seed = 0  # Seeds the passkeys.

  cfg.lock()
  return cfg


def search_recipe(cfg) -> ml_collections.ConfigDict:
  """`cfg` set to the paper's temperature search (docs/method.md, section 3), for any pretraining config.

  Only the temperatures train: AdamW (0.9, 0.95), no weight decay, clip 1.0, lr 0.1, 200 steps
  of batch 8, 10% linear warmup then cosine to 0.1 x lr, c_h >= 1 after every step. The caller
  sets the target length (data.seq_len) and the start (search.init).
  """
  cfg.train.trainable = 'temperature'
  cfg.train.steps = 200
  cfg.train.batch_size = 8
  cfg.train.learning_rate = 0.1
  cfg.train.warmup_steps = 20
  cfg.train.final_lr_fraction = 0.1
  cfg.train.b1 = 0.9
  cfg.train.b2 = 0.95
  cfg.train.weight_decay = 0.0
  cfg.train.clip_norm = 1.0
  cfg.search.min_temperature = 1.0
  return cfg
