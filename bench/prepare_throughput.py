"""Tokens/s of `python -m nopejax.prepare` on the DirectRunner with 1 and 2 worker processes.

  .venv/bin/python bench/prepare_throughput.py                      # 256 MB, byte and SentencePiece
  .venv/bin/python bench/prepare_throughput.py --mb 64 --tokenizers byte

The corpus is made here: the standard library's .py files as documents (real text, on every
machine), repeated into 16 .jsonl shards of --mb MB in all. The SentencePiece model is a 32,000-piece
BPE with byte fallback, as Llama 2's, trained here on a sample of it. Each run is the command itself
(`-- --direct_num_workers=N --direct_running_mode=multi_processing`), timed from start to index.json:
wall time, tokens/s, and tokens per CPU-second of the command and its workers, which is what one core
gives whatever else the machine runs. From that rate it extrapolates the wall time of --tokens tokens
on --dataflow_workers workers of --cores_per_worker vCPUs each, assuming a Dataflow vCPU tokenizes at
this machine's rate per core and the work splits evenly (one input file per task, far more files
than cores). Start-up, GCS reads and writes, and stragglers are left out: it is an extrapolation.
"""
import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def write_corpus(directory: pathlib.Path, megabytes: int, shards: int = 16) -> int:
  """--mb MB of .jsonl shards (the standard library's files as documents, round robin); returns bytes of text."""
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  texts = [p.read_text(errors='replace') for p in sorted(stdlib.rglob('*.py')) if 'site-packages' not in p.parts]
  texts = [t for t in texts if t]
  directory.mkdir(parents=True, exist_ok=True)
  outs = [open(directory / f'part-{i:03d}.jsonl', 'w') for i in range(shards)]
  written = i = 0
  while written < megabytes << 20:
    text = texts[i % len(texts)]
    outs[i % shards].write(json.dumps({'text': text}) + '\n')
    written += len(text.encode())
    i += 1
  for out in outs:
    out.close()
  return written


def train_sentencepiece(corpus: pathlib.Path, prefix: pathlib.Path) -> str:
  import sentencepiece
  sample = prefix.parent / 'sample.txt'
  with open(corpus / 'part-000.jsonl') as lines, open(sample, 'w') as out:
    size = 0
    for line in lines:
      text = json.loads(line)['text']
      out.write(text + '\n')
      size += len(text)
      if size > 8 << 20:
        break
  sentencepiece.SentencePieceTrainer.train(
      input=str(sample), model_prefix=str(prefix), vocab_size=32000, model_type='bpe', byte_fallback=True,
      character_coverage=0.9995, input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2)
  return str(prefix) + '.model'


def run_prepare(corpus: pathlib.Path, tokenizer: str, out: pathlib.Path, workers: int) -> dict:
  command = [sys.executable, '-m', 'nopejax.prepare', '--config', 'configs/tiny.py',
             f'--config.data.train_files={corpus}/*.jsonl', f'--config.data.tokenizer={tokenizer}',
             '--config.model.vocab_size=32000', '--out', str(out), '--',
             f'--direct_num_workers={workers}', '--direct_running_mode=multi_processing']
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  index = json.loads((out / 'index.json').read_text())
  tokens = sum(s['tokens'] for s in index['shards'])
  return {'workers': workers, 'tokens': tokens, 'wall_s': wall, 'cpu_s': cpu,
          'tokens_per_s': tokens / wall, 'tokens_per_cpu_s': tokens / cpu}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mb', type=int, default=256, help='Corpus size in MB of text.')
  parser.add_argument('--tokenizers', default='byte,sentencepiece')
  parser.add_argument('--workers', default='1,2')
  parser.add_argument('--tokens', type=float, default=950e9, help='Tokens of the extrapolated corpus.')
  parser.add_argument('--dataflow_workers', type=int, default=100)
  parser.add_argument('--cores_per_worker', type=int, default=4, help='vCPUs of a Dataflow worker (n2-standard-4: 4).')
  parser.add_argument('--work', default=None, help='Scratch directory (default: a temporary one, removed).')
  args = parser.parse_args()
  work = pathlib.Path(args.work or tempfile.mkdtemp(prefix='prepare_bench_'))
  try:
    corpus_bytes = write_corpus(work / 'corpus', args.mb)
    print(f'corpus: {corpus_bytes / 2**20:.0f} MB of text in 16 .jsonl shards')
    rows = []
    for name in args.tokenizers.split(','):
      tokenizer = 'byte' if name == 'byte' else train_sentencepiece(work / 'corpus', work / 'sp')
      for workers in map(int, args.workers.split(',')):
        out = work / f'out-{name}-{workers}'
        row = dict(run_prepare(work / 'corpus', tokenizer, out, workers), tokenizer=name)
        row['mb_per_s'] = corpus_bytes / 2**20 / row['wall_s']
        rows.append(row)
        print(json.dumps(row))
        shutil.rmtree(out)
    print('\n| tokenizer | workers | tokens | wall s | tokens/s | MB/s of text | tokens per CPU-s |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
      print(f'| {r["tokenizer"]} | {r["workers"]} | {r["tokens"]:,} | {r["wall_s"]:.1f} | {r["tokens_per_s"]:,.0f} '
            f'| {r["mb_per_s"]:.2f} | {r["tokens_per_cpu_s"]:,.0f} |')
    cores = args.dataflow_workers * args.cores_per_worker
    for r in rows:
      if r['workers'] == max(x['workers'] for x in rows if x['tokenizer'] == r['tokenizer']):
        hours = args.tokens / (r['tokens_per_cpu_s'] * cores) / 3600
        print(f'extrapolation ({r["tokenizer"]}): {args.tokens:.3g} tokens on {args.dataflow_workers} workers x '
              f'{args.cores_per_worker} vCPUs at {r["tokens_per_cpu_s"]:,.0f} tokens per CPU-s: {hours:.1f} h')
  finally:
    if not args.work:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
