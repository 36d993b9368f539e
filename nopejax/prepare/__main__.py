"""`python -m nopejax.prepare --config C --out DIR [--split train|eval] [-- BEAM OPTIONS]`.

Tokenizes the split's text shards (data.train_files or data.eval_files, read with data.text_key and
data.tokenizer) into ArrayRecord shards and index.json in DIR. Beam's own pipeline options follow
`--`; without them the DirectRunner runs two local worker processes. On Dataflow:

  python -m nopejax.prepare --config configs/1b.py --out gs://BUCKET/tokens/train -- \\
      --runner=DataflowRunner --project=PROJECT --region=REGION --temp_location=gs://BUCKET/tmp \\
      --extra_package=dist/nopejax-0.1.0-py3-none-any.whl --num_workers=100
"""
from absl import app, flags

from nopejax import cli

_OUT = flags.DEFINE_string('out', None, 'Directory (or gs:// URL) for the shards and index.json; new or empty.')
_SPLIT = flags.DEFINE_enum('split', 'train', ['train', 'eval'], 'Which files: data.train_files or data.eval_files.')


def main(argv):
  import logging
  from nopejax import config, host, prepare
  host.quiet_libraries()
  # Beam logs each worker's start-up, its option parsing and a failing worker's traceback; the failure
  # is raised all the same (a bad record's as one sentence).
  logging.getLogger('apache_beam').setLevel(logging.CRITICAL)
  if not _OUT.value:
    cli.fail('No --out given; pass --out DIR for the shards (a new or empty directory, or a gs:// URL).')
  try:
    index = prepare.run(cli.CONFIG.value, _OUT.value, _SPLIT.value, beam_args=argv[1:])
  except config.ConfigError as e:
    cli.fail(str(e))
  documents = sum(s['documents'] for s in index['shards'])
  tokens = sum(s['tokens'] for s in index['shards'])
  print(f'{_OUT.value}: {len(index["shards"])} shards, {documents} documents, {tokens} tokens.')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
