"""Pre-tokenization on Apache Beam: a split's text shards (data.train_files / data.eval_files) become
ArrayRecord shards of token ids plus `index.json` (the format of nopejax/data/shards.py), written by
as many workers as the runner has: the DirectRunner's local processes, or Dataflow, Flink, Spark.

Input file i (in sorted order) becomes output shard i, its records the file's documents in order,
so the output is the same byte for byte whatever the runner and the number of workers. No step holds
more than one input file: the corpus is never gathered on one machine. The index is written last, so
its presence means the directory is complete.

The command line is `python -m nopejax.prepare` (__main__.py). The functions the workers run live
here rather than in __main__, so that Beam pickles them by reference to this module.
"""
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import zlib

from etils import epath

from nopejax import config
from nopejax.data import shards

SPLITS = ('train', 'eval')
# Beam's own options when the command names no --runner, before the user's (which override them):
# two local worker processes (processes, not threads: tokenizing holds the GIL) that log nothing of
# their own (a failure comes back to the command, which reports it).
DIRECT_DEFAULTS = ('--direct_num_workers=2', '--direct_running_mode=multi_processing',
                   '--default_sdk_harness_log_level=CRITICAL')
# How a worker's config.ConfigError reads in the runner's error (a traceback's last line).
_WORKER_ERROR = re.compile(r'^nopejax\.config\.ConfigError: (.+)$', re.M)
# Every record its own group, as tfds writes ArrayRecord: a reader fetches any document alone.
WRITER_OPTIONS = 'group_size:1'


def files_key(split: str) -> str:
  return f'data.{split}_files'


def input_files(cfg, split: str) -> list[str]:
  """The split's raw text shards, sorted (files.match): their order numbers the output shards."""
  from nopejax.data import files
  key = files_key(split)
  setting = cfg.data.train_files if split == 'train' else cfg.data.eval_files
  if not setting.strip():
    raise config.ConfigError(f'{key} is empty; set it to the glob(s) of the {split} text shards, e.g.'
                             f' --config.{key}=gs://BUCKET/corpus/{split}/*.jsonl.zst.')
  paths = files.match(setting, key)
  if files.prepared_paths(paths, key) is not None:
    raise config.ConfigError(f'{key} names shards that are already prepared; point it at the raw text shards'
                             ' (.jsonl, .jsonl.gz, .jsonl.zst, .parquet, .txt).')
  return paths


def shard_name(split: str, i: int, count: int) -> str:
  return f'{split}-{i:05d}-of-{count:05d}.array_record'


def check_output(out: str) -> epath.Path:
  """The output directory, created; refused if it already holds files or cannot be written."""
  path = epath.Path(out)
  try:
    path.mkdir(parents=True, exist_ok=True)  # On gs:// nothing: a prefix exists while it holds objects.
    if path.exists() and any(path.iterdir()):
      raise config.ConfigError(f'--out {out} is not empty; pass a new or empty directory (prepare never'
                               ' overwrites shards).')
    probe = path / '.nopejax_write_probe'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise config.ConfigError(f'--out {out} cannot be written ({type(e).__name__}: {e}); pass a directory'
                             ' you can write to.') from None
  return path


def pack_job(cfg, paths: list[str], out: str, split: str) -> bytes:
  """What every worker needs, compressed: the config and the input file names. The names travel
  once, inside the pipeline's description, and compress well (a corpus of 60,000 files keeps the
  job far below Dataflow's limit on its size); the elements themselves are file numbers."""
  return zlib.compress(json.dumps({'cfg': cfg.to_dict(), 'paths': paths, 'out': out, 'split': split}).encode())


@functools.cache
def _unpack(job: bytes):
  """The job's (cfg, paths, out, split) and its tokenizer, once per worker process, not per file."""
  from nopejax.data import tokenizers
  values = json.loads(zlib.decompress(job))
  cfg = config.from_dict(values['cfg'])
  return cfg, values['paths'], values['out'], values['split'], tokenizers.make_tokenizer(cfg)


@contextlib.contextmanager
def _local_copy(dest: epath.Path):
  """A local path to write `dest` at: `dest` itself, via a rename, on a local disk; else a
  temporary file copied to `dest` (the ArrayRecord writer writes local files only)."""
  if '://' not in os.fspath(dest):
    tmp = dest.parent / (dest.name + '.tmp')
    yield os.fspath(tmp)
    tmp.rename(dest)
    return
  with tempfile.TemporaryDirectory() as tmp_dir:
    local = os.path.join(tmp_dir, dest.name)
    yield local
    with open(local, 'rb') as src, dest.open('wb') as dst:
      shutil.copyfileobj(src, dst, 16 << 20)


def write_shard(i: int, job: bytes) -> dict:
  """Tokenizes input file i into output shard i; returns its index entry. Runs on a worker; a retried
  bundle rewrites the same bytes, so retries are harmless."""
  from array_record.python import array_record_module
  from nopejax.data import files, tokenizers
  cfg, paths, out, split, tokenizer = _unpack(job)
  name = shard_name(split, i, len(paths))
  documents = tokens = 0
  with _local_copy(epath.Path(out) / name) as local:
    writer = array_record_module.ArrayRecordWriter(local, WRITER_OPTIONS)
    try:
      for text in files.ShardDataset(files.Shard(paths[i], cfg.data.text_key, cfg.data.skip_bad_records)):
        ids = tokenizers.encode_document(tokenizer, text)
        writer.write(shards.encode_record(ids))
        documents += 1
        tokens += len(ids)
    finally:
      writer.close()
  return {'index': i, 'file': name, 'documents': documents, 'tokens': tokens}


def write_index(entries, out: str, split: str, tokenizer: dict) -> None:
  """Writes index.json from every shard's entry (in shard order, whatever order they came in)."""
  entries = sorted(entries, key=lambda e: e['index'])
  shards.write_index(out, {
      'tokenizer': tokenizer,
      'split': split,
      'shards': [{k: e[k] for k in ('file', 'documents', 'tokens')} for e in entries],
  })


def build(pipeline, cfg, paths: list[str], out: str, split: str):
  """Adds the pipeline's steps: one element per input file, spread over the workers, then the index."""
  import apache_beam as beam
  return (pipeline
          | 'Files' >> beam.Create(range(len(paths)))
          | 'Spread' >> beam.Reshuffle()  # Else a runner may fuse all files into one worker's bundle.
          | 'Tokenize' >> beam.Map(write_shard, job=pack_job(cfg, paths, out, split))
          | 'Gather' >> beam.combiners.ToList()
          | 'Index' >> beam.Map(write_index, out=out, split=split,
                                tokenizer=shards.tokenizer_identity(cfg.data.tokenizer)))


def local_runner(options):
  """The DirectRunner's batch engine (the FnApiRunner), built as the DirectRunner builds it, but
  without the DirectRunner's first try: downloading the Prism runner, which ignores the worker count."""
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability import portable_runner
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  encoded = portable_runner.JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def run(cfg, out: str, split: str = 'train', beam_args=()) -> dict:
  """Prepares `split` into `out` with Beam and returns the index. `beam_args`: Beam's pipeline
  options (--runner=DataflowRunner ...); without a --runner, the DirectRunner's engine with two local
  processes. Raises config.ConfigError on bad input."""
  config.validate(cfg)
  if split not in SPLITS:
    raise config.ConfigError(f'--split {split} is not one of {", ".join(SPLITS)}; pass one of them.')
  logging.disable(logging.WARNING)  # Beam warns on import that its optional GCP clients are missing.
  try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
  except ImportError:
    raise config.ConfigError("apache-beam is not installed; install it with pip install 'nopejax[beam]'.") from None
  finally:
    logging.disable(logging.NOTSET)
  for arg in beam_args:
    if not arg.startswith('--'):
      raise config.ConfigError(f'Unexpected argument {arg!r}; Beam options after -- look like --runner=DataflowRunner.')
  from nopejax.data import tokenizers
  tokenizers.make_tokenizer(cfg)  # A bad data.tokenizer fails here, not on every worker.
  paths = input_files(cfg, split)
  runner_name = PipelineOptions(list(beam_args)).view_as(StandardOptions).runner
  options = PipelineOptions([*beam_args] if runner_name else [*DIRECT_DEFAULTS, *beam_args])
  local = '://' not in out or any('://' not in p for p in paths)
  if runner_name and local and runner_name.split('.')[-1] not in StandardOptions.LOCAL_RUNNERS:
    raise config.ConfigError(f'--runner={runner_name} runs on other machines, which cannot read or write this'
                             " machine's files; put the input shards and --out on shared storage such as gs://.")
  check_output(out)
  runner = None if runner_name else local_runner(options)
  logging.info('Tokenizing %d files into %s on %s.', len(paths), out, runner_name or
               f'the DirectRunner, {options.view_as(DirectOptions).direct_num_workers} local processes')
  try:
    with beam.Pipeline(runner=runner, options=options) as pipeline:
      build(pipeline, cfg, paths, out, split)
  except Exception as e:  # A worker's bad-input sentence (a bad record) comes back inside the runner's error.
    found = [str(e)] if isinstance(e, config.ConfigError) else _WORKER_ERROR.findall(str(e))
    if not found:
      raise
    sentence = re.sub(r' \[while running [^\]]*\]$', '', found[-1].strip()).rstrip('.')
    raise config.ConfigError(f'{sentence}; then empty {out} (left without index.json) and run again.') from None
  return shards.read_index(out)
