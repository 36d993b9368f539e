"""Tokens/s one process gets reading raw shards in place (data.dataset='files'): .jsonl.zst and
.parquet, a SentencePiece tokenizer, batch 16 x 2048, against what the 1B run needs per host.

  .venv/bin/python bench/read_shards.py                      # 16 shards of each format, 8 MB of text
  .venv/bin/python bench/read_shards.py --mb 16 --batches 64 --tokenizer llama2.model

The text is the Python standard library (the bundled corpus), one file per document, repeated to
--mb; without --tokenizer a 32000-piece SentencePiece BPE model is trained on it first (minutes).
For each format it times the training stream from its start to its last batch (--batches, 5
shuffle windows by default), reports tokens/s of wall time and per CPU second of this process (all
its threads: the figure that depends least on what else runs on the machine), and the tokenizer
alone on the same documents in one thread. The need per host is global tokens per step / hosts / step time.
"""
import argparse
import json
import os
import pathlib
import resource
import shutil
import sysconfig
import tempfile
import time

from nopejax import config, data

SEQ_LEN, BATCH = 2048, 16
# The 1B recipe on v5e-256: 1024 x 2048 tokens per step over 64 hosts (4 chips each).
GLOBAL_TOKENS, HOSTS = 1024 * 2048, 64


def stdlib_documents(megabytes: float) -> list[str]:
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  texts = [p.read_text(errors='replace') for p in sorted(root.rglob('*.py')) if 'site-packages' not in p.parts]
  out, size = [], 0
  while size < megabytes * 1e6:
    for text in texts:
      out.append(text)
      size += len(text)
      if size >= megabytes * 1e6:
        break
  return out


def write_shards(directory: pathlib.Path, documents: list[str], shards: int) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  directory.mkdir(parents=True, exist_ok=True)
  for shard in range(shards):
    mine = documents[shard::shards]
    lines = b''.join(json.dumps({'text': text}).encode() + b'\n' for text in mine)
    (directory / f'{shard:03d}.jsonl.zst').write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
    pq.write_table(pa.table({'text': mine}), directory / f'{shard:03d}.parquet', row_group_size=256)


def train_tokenizer(directory: pathlib.Path, documents: list[str]) -> str:
  import sentencepiece
  corpus = directory / 'tokenizer_corpus.txt'
  corpus.write_text('\n'.join(line for text in documents[:4000] for line in text.splitlines() if line.strip()))
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(directory / 'sp32k'), vocab_size=32000, model_type='bpe',
      input_sentence_size=300000, shuffle_input_sentence=True, minloglevel=2, num_threads=os.cpu_count())
  return str(directory / 'sp32k.model')


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def time_stream(cfg, batches: int) -> dict:
  """From opening the stream to its `batches`-th batch: several shuffle windows, each read whole
  before it yields (the read-ahead thread hides that from a training step, not from this average)."""
  start_wall, start_cpu = time.perf_counter(), cpu_seconds()
  iterator = data.train_iterator(cfg)
  next(iterator)
  first = time.perf_counter() - start_wall
  for _ in range(batches - 1):
    batch = next(iterator)
  wall, cpu = time.perf_counter() - start_wall, cpu_seconds() - start_cpu
  assert batch['inputs'].shape == (BATCH, SEQ_LEN)
  iterator.close()
  tokens = batches * BATCH * SEQ_LEN
  return {'first_batch_s': first, 'tokens_per_s': tokens / wall, 'tokens_per_cpu_s': tokens / cpu}


def time_tokenizer(cfg, documents: list[str]) -> float:
  tokenizer = data.make_tokenizer(cfg)
  start, tokens = cpu_seconds(), 0
  for text in documents:
    tokens += len(tokenizer.encode(text))
  return tokens / (cpu_seconds() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mb', type=float, default=8, help='megabytes of text per format')
  parser.add_argument('--shards', type=int, default=16)
  parser.add_argument('--batches', type=int, default=320, help='timed batches of 16 x 2048, from the start')
  parser.add_argument('--tokenizer', default='', help='a SentencePiece .model (default: train one here)')
  parser.add_argument('--shuffle_buffer', type=int, default=1024)
  parser.add_argument('--open_shards', type=int, default=8)
  parser.add_argument('--step_time', type=float, default=0.55,
                      help='assumed 1B step time on v5e-256 in seconds (see the printed note)')
  parser.add_argument('--dir', default='', help='where to write the shards and keep them (default: a temporary directory)')
  args = parser.parse_args()
  directory = pathlib.Path(args.dir or tempfile.mkdtemp(prefix='nopejax-read-shards-'))
  documents = stdlib_documents(args.mb)
  write_shards(directory, documents, args.shards)
  tokenizer = args.tokenizer or train_tokenizer(directory, documents)

  cfg = config.get_config()
  cfg.data.dataset = 'files'
  cfg.data.tokenizer = tokenizer
  cfg.model.vocab_size = 32000
  cfg.data.seq_len = SEQ_LEN
  cfg.train.batch_size = BATCH
  cfg.data.shuffle_buffer = args.shuffle_buffer
  cfg.data.open_shards = args.open_shards
  need = GLOBAL_TOKENS / HOSTS / args.step_time
  print(f'cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; {len(documents)} documents, '
        f'{args.mb:g} MB of text per format in {args.shards} shards; tokenizer {tokenizer}')
  print(f'tokenizer alone, one thread: {time_tokenizer(cfg, documents[:2000]):,.0f} tokens per CPU second')
  print(f'{args.batches} batches of {BATCH} x {SEQ_LEN} from the start of each stream, shuffle buffer {args.shuffle_buffer}'
        f' windows, {args.open_shards} shards open:')
  for suffix in ('jsonl.zst', 'parquet'):
    cfg.data.train_files = str(directory / f'*.{suffix}')
    result = time_stream(cfg, args.batches)
    print(f'.{suffix}: {result["tokens_per_s"]:,.0f} tokens/s wall, {result["tokens_per_cpu_s"]:,.0f} tokens per CPU '
          f'second; first batch after {result["first_batch_s"]:.1f} s (the first shuffle window); per host the 1B run'
          f' needs {need:,.0f} tokens/s')
  if not args.dir:
    shutil.rmtree(directory)
  print(f'need = {GLOBAL_TOKENS:,} tokens per step / {HOSTS} hosts / {args.step_time} s per step (an assumption: '
        "TinyLlama's ~24K tokens/s per A100 scaled by v5e's 197 / A100's 312 bf16 TFLOPs = ~15K tokens/s per chip, "
        'x 256 chips = 3.9M tokens/s, so 2.1M tokens take ~0.55 s)')


if __name__ == '__main__':
  main()
