"""NoPE against the position encodings people use, on the same data, steps and seeds: one command.

  python -m nopejax.compare --config configs/tiny.py --out runs/compare            # make compare
  python -m nopejax.compare --config configs/tiny.py --out runs/compare --seeds 5 --steps 0

For each seed it pretrains NoPE, RoPE and ALiBi models (`--steps` training steps, 0 = the config's
train.steps), searches NoPE's per-head temperatures at 4x the training length (the paper's recipe,
as configs/tiny_search.py), and evaluates at 1x to 16x the training length (cfg.eval.lengths):
  NoPE; NoPE with a uniform temperature (--temperature); NoPE with the searched temperatures;
  RoPE; RoPE zero-shot with position interpolation, NTK, YaRN (each at s = evaluated length / L)
  and log-n; ALiBi. With `--config.model.position=rope --config.model.rope_layers=every:4` (any
  model.rope_layers) it also pretrains and evaluates that RoPE/NoPE hybrid (the last row).
Writes OUT/compare.md (perplexity mean ± standard deviation over seeds per length, and which
differences exceed the seed spread), OUT/compare.png and OUT/compare.json. Every finished piece
(a pretraining, a search, an evaluation) is found on disk and skipped when the command runs again
with the same inputs: an evaluation made from other inputs (another --temperature, --steps, seed,
config or eval.* key) is made again, and a pretraining or search made with another config is
refused, since its checkpoints would be reported under this command's settings.
"""
import json
import math
import time

from absl import logging
from etils import epath

PRETRAININGS = ('nope', 'rope', 'alibi')
SEARCHED = 'NoPE, searched c_h'


def pretrainings(cfg) -> tuple:
  """PRETRAININGS, and 'hybrid' when the config names a hybrid's layers (model.rope_layers)."""
  return PRETRAININGS + (('hybrid',) if cfg.model.rope_layers else ())


def variants(temperature: float, original_length: int, rope_layers: str = ''):
  """(label, pretraining ('nope_search' = the searched temperatures), evaluation overrides) of each row;
  a hybrid's row last, so the other rows keep their evaluation directories."""
  scaled = lambda method: {'model.rope_scaling': method, 'model.rope_scaling_factor': 0.0,
                           'model.original_length': original_length}
  return [
      ('NoPE', 'nope', {}),
      (f'NoPE, uniform c={temperature:g}', 'nope', {'model.temperature': temperature}),
      (SEARCHED, 'nope_search', {}),
      ('RoPE', 'rope', {}),
      ('RoPE + PI (linear)', 'rope', scaled('linear')),
      ('RoPE + NTK', 'rope', scaled('ntk')),
      ('RoPE + YaRN', 'rope', scaled('yarn')),
      ('RoPE + log-n', 'rope', {'model.logn': True, 'model.original_length': original_length}),
      ('ALiBi', 'alibi', {}),
  ] + ([(f'Hybrid RoPE/NoPE ({rope_layers})', 'hybrid', {})] if rope_layers else [])


def pretrain_config(cfg, position: str, seed: int, steps: int):
  """cfg for one pretraining: the position method and the seed (weights and data order), `steps` if > 0."""
  cfg = _copy(cfg)
  cfg.model.position = 'rope' if position == 'hybrid' else position  # A hybrid: RoPE on model.rope_layers.
  cfg.model.rope_layers = cfg.model.rope_layers if position == 'hybrid' else ''
  cfg.train.seed = seed
  cfg.data.shuffle_seed = seed
  if steps:
    cfg.train.steps = steps
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, steps // 10)
    cfg.train.checkpoint_every = min(cfg.train.checkpoint_every, steps)
    cfg.train.eval_every = min(cfg.train.eval_every, steps)
  return cfg


def search_config(cfg, base_workdir: str):
  """The paper's temperature search at 4x the pretraining length from `base_workdir` (configs/tiny_search.py)."""
  from nopejax import config
  cfg = config.search_recipe(_copy(cfg))
  cfg.data.seq_len = 4 * cfg.data.seq_len
  cfg.train.log_every = 20
  cfg.train.eval_every = 0
  cfg.train.checkpoint_every = 100
  cfg.search.init = 'auto'
  cfg.search.base = base_workdir
  return cfg


def _copy(cfg):
  from nopejax import config
  return config.from_dict(cfg.to_dict())


def _flat(values: dict, prefix='') -> dict:
  """{'train.steps': 600, ...} of a nested dict."""
  flat = {}
  for key, value in values.items():
    flat.update(_flat(value, f'{prefix}{key}.') if isinstance(value, dict) else {f'{prefix}{key}': value})
  return flat


def check_made_with(workdir, run_cfg) -> None:
  """Refuses a pretraining or search in `workdir` that another config made (another --steps, config
  file or override): resuming or reusing it would report that run under this command's settings."""
  from nopejax import config
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    return
  saved, ours = _flat(json.loads(path.read_text())), _flat(json.loads(config.to_json(run_cfg)))
  differ = sorted(key for key in saved.keys() | ours.keys() if saved.get(key) != ours.get(key))
  if differ:
    key = differ[0]
    raise config.ConfigError(f'{workdir} was made with {key}={saved.get(key)!r} but this command asks for '
                             f'{ours.get(key)!r}; pass another --out, or delete {workdir} to make it again.')


def evaluation_inputs(source_dir, source_cfg, overrides: dict) -> dict:
  """Everything an evaluation's result depends on: the run evaluated (its config holds the seed,
  steps and method) and every evaluation override (eval.*, the variant's, its temperature)."""
  from nopejax import config
  return json.loads(json.dumps({'workdir': str(source_dir), 'config': json.loads(config.to_json(source_cfg)),
                                'overrides': overrides}))


def _finished(workdir, steps: int) -> bool:
  from nopejax import checkpoint
  return checkpoint.latest_step(workdir) == steps if (epath.Path(workdir) / 'config.json').exists() else False


def eval_overrides(cfg, fast: bool) -> dict:
  """The evaluation settings of every variant: the config's eval.*; when `fast`, no passkey (the tiny
  byte models retrieve none at any length), fewer curve documents, at most 2048 scored tokens per length."""
  overrides = {f'eval.{key}': value for key, value in cfg.eval.items()}
  if fast:
    overrides.update({'eval.passkey_keys': 0, 'eval.entropy_documents': 4, 'eval.position_documents': 16,
                      'eval.max_tokens': min(cfg.eval.max_tokens, 2048)})
  return overrides


def _timings(out) -> dict:
  path = epath.Path(out) / 'timings.json'
  return json.loads(path.read_text()) if path.exists() else {}


def run_seed(cfg, out, seed: int, steps=600, temperature=1.5, fast=True) -> None:
  """One seed's pieces: pretrain NoPE, RoPE, ALiBi; search NoPE's temperatures; evaluate every variant.

  Pieces found finished on disk are skipped; each one's wall time goes into OUT/timings.json.
  """
  from nopejax import evaluate, loop
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)

  def timed(name, fn):
    start = time.time()
    fn()
    timings = _timings(out)  # Read again: another process may be running another seed.
    timings[name] = round(time.time() - start, 1)
    (out / 'timings.json').write_text(json.dumps(timings, indent=1))

  overrides = eval_overrides(cfg, fast)
  for position in pretrainings(cfg):
    run_cfg = pretrain_config(cfg, position, seed, steps)
    workdir = str(out / f'{position}_s{seed}')
    check_made_with(workdir, run_cfg)
    if not _finished(workdir, run_cfg.train.steps):
      logging.info('compare: pretraining %s seed %d -> %s', position, seed, workdir)
      timed(f'pretrain {position} s{seed}', lambda: loop.run(run_cfg, workdir))
  search_cfg = search_config(pretrain_config(cfg, 'nope', seed, steps), str(out / f'nope_s{seed}'))
  search_dir = str(out / f'nope_search_s{seed}')
  check_made_with(search_dir, search_cfg)
  if not _finished(search_dir, search_cfg.train.steps):
    logging.info('compare: temperature search seed %d -> %s', seed, search_dir)
    timed(f'search s{seed}', lambda: loop.run(search_cfg, search_dir))
  source_cfgs = {position: pretrain_config(cfg, position, seed, steps) for position in pretrainings(cfg)}
  source_cfgs['nope_search'] = search_cfg
  for index, (label, source, variant_overrides) in enumerate(variants(temperature, cfg.data.seq_len,
                                                                      cfg.model.rope_layers)):
    eval_dir = out / 'eval' / f'v{index}_s{seed}'
    source_dir = out / f'{source}_s{seed}'
    inputs = evaluation_inputs(source_dir, source_cfgs[source], dict(overrides, **variant_overrides))
    made_from = eval_dir / 'inputs.json'
    done = (eval_dir / 'results.json').exists() and made_from.exists() and json.loads(made_from.read_text()) == inputs
    if not done:
      logging.info('compare: evaluating %s seed %d -> %s', label, seed, eval_dir)
      timed(f'eval v{index} s{seed}', lambda: evaluate.evaluate(
          str(source_dir), dict(overrides, **variant_overrides), str(eval_dir)))
      made_from.write_text(json.dumps(inputs, indent=1))


def run(cfg, out, seeds=3, steps=600, temperature=1.5, fast=True) -> dict:
  """Everything the command does, seed by seed (a cut-short run leaves whole seeds); returns the
  summary written to OUT/compare.json."""
  for seed in range(seeds):
    run_seed(cfg, out, seed, steps, temperature, fast)
  return summarize(out, variants(temperature, cfg.data.seq_len, cfg.model.rope_layers), seeds, cfg.data.seq_len,
                   _timings(out))


# ---------------------------------------------------------------------------------------------
# The table and the plot.


def _stats(values):
  """(mean, sample standard deviation (0 for one value), min, max) of the finite values, or None."""
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return None
  mean = sum(values) / len(values)
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
  return mean, sd, min(values), max(values)


def verdict(a, b) -> str:
  """'better', 'worse' or 'within the seed spread': a's perplexities against b's (lists over seeds).

  A difference counts only with two seeds or more on each side, when the means differ by more than
  the larger of the two ranges (max - min over seeds) and the ranges do not overlap.
  """
  sa, sb = _stats(a), _stats(b)
  if not sa or not sb or min(len(a), len(b)) < 2:
    return 'not comparable (fewer than 2 seeds)'
  spread = max(sa[3] - sa[2], sb[3] - sb[2])
  if sb[0] - sa[0] > spread and sa[3] < sb[2]:
    return 'better'
  if sa[0] - sb[0] > spread and sb[3] < sa[2]:
    return 'worse'
  return 'within the seed spread'


def verdicts(per_variant: dict, reference: str, length: str) -> list[str]:
  """One sentence per variant: `reference` at `length` better, worse or within the spread."""
  sentences = []
  for label, runs in per_variant.items():
    if label != reference and runs.get(length) and per_variant[reference].get(length):
      sentences.append(f'{reference} vs {label}: {verdict(per_variant[reference][length], runs[length])}')
  return sentences


def summarize(out, rows, seeds, pretrain_length, timings) -> dict:
  """compare.md, compare.png and compare.json from the evaluations present in OUT/eval."""
  out = epath.Path(out)
  per_variant = {}  # label -> {length: [perplexity per seed]}
  seeds_done = {}
  for index, (label, _, _) in enumerate(rows):
    runs = per_variant.setdefault(label, {})
    for seed in range(seeds):
      path = out / 'eval' / f'v{index}_s{seed}' / 'results.json'
      if path.exists():
        results = json.loads(path.read_text())
        seeds_done.setdefault(label, []).append(seed)
        for n, ppl in results['perplexity'].items():
          runs.setdefault(n, []).append(ppl)
  lengths = sorted({int(n) for runs in per_variant.values() for n in runs})
  header = '| method | seeds | ' + ' | '.join(f'{n} ({n // pretrain_length}x)' for n in lengths) + ' |'
  lines = ['# NoPE against position encodings', '',
           f'Sliding-window perplexity by evaluation length, mean ± standard deviation over seeds '
           f'(pretraining length {pretrain_length}).', '', header, '|---|---|' + '---|' * len(lengths)]
  for label, runs in per_variant.items():
    cells = []
    for n in lengths:
      s = _stats(runs.get(str(n), []))
      cells.append('n/a' if s is None else f'{s[0]:.2f} ± {s[1]:.2f}')
    lines.append(f'| {label} | {len(seeds_done.get(label, []))} | ' + ' | '.join(cells) + ' |')
  if lengths:
    longest = str(max(lengths))
    lines += ['', f'At {longest} tokens; a difference counts when the means differ by more than the larger seed '
              'range (min to max) and the ranges do not overlap:', '']
    lines += [f'- {sentence}' for sentence in verdicts(per_variant, SEARCHED, longest)]
  total = sum(timings.values())
  lines += ['', f'Wall time of the pieces run so far: {total / 60:.1f} minutes (timings.json).', '',
            '![compare.png](compare.png)', '']
  (out / 'compare.md').write_text('\n'.join(lines))
  summary = {'pretrain_length': pretrain_length, 'lengths': lengths, 'seeds': seeds_done,
             'perplexity': per_variant, 'timings_s': timings}
  (out / 'compare.json').write_text(json.dumps(summary, indent=1))
  if lengths:
    _plot(per_variant, lengths, pretrain_length, out / 'compare.png')
  return summary


def _plot(per_variant, lengths, pretrain_length, path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
  for label, runs in per_variant.items():
    stats = [_stats(runs.get(str(n), [])) for n in lengths]
    xs = [n for n, s in zip(lengths, stats) if s]
    if not xs:
      continue
    stats = [s for s in stats if s]
    line, = ax.plot(xs, [s[0] for s in stats], marker='o', label=label, linestyle='--' if 'RoPE' in label else '-')
    ax.fill_between(xs, [s[2] for s in stats], [s[3] for s in stats], color=line.get_color(), alpha=0.15)
  ax.axvline(pretrain_length, color='gray', linestyle=':', linewidth=1)
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.minorticks_off()
  ax.set(xlabel='evaluation length (tokens)', ylabel='perplexity (mean, band: min to max over seeds)',
         title='NoPE against position encodings')
  ax.legend(fontsize=8)
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv):
  from absl import flags
  from nopejax import config
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    config.exit_with_sentence(f'Unexpected arguments {argv[1:]}; every setting is a flag or --config.key=value.')
  if FLAGS.config is None:
    config.exit_with_sentence('No --config given; pass one, e.g. --config configs/tiny.py.')
  try:
    cfg = FLAGS.config
    config.validate(cfg)
    if FLAGS.seeds < 1 or FLAGS.steps < 0:
      raise config.ConfigError(f'--seeds={FLAGS.seeds} must be at least 1 and --steps={FLAGS.steps} not negative; '
                               'set e.g. --seeds 3 --steps 600.')
    from nopejax import checkpoint
    checkpoint.check_writable(FLAGS.out, '--out')  # Before hours of training fill it.
    run(cfg, FLAGS.out, FLAGS.seeds, FLAGS.steps, FLAGS.temperature, FLAGS.fast_eval)
  except config.ConfigError as e:
    config.exit_with_sentence(str(e))


if __name__ == '__main__':
  from absl import app, flags
  from nopejax import cli  # Defines --config; its parser makes a missing or broken file one sentence.
  flags.DEFINE_string('out', 'runs/compare', 'Directory for every run, evaluation and the table.')
  flags.DEFINE_integer('seeds', 3, 'Seeds 0 .. N-1: each pretrains every method once.')
  flags.DEFINE_integer('steps', 600, 'Pretraining steps of every model (600 keeps 3 seeds of the tiny model near an '
                       'hour on 2 shared cores); 0 = the config\'s train.steps.')
  flags.DEFINE_float('temperature', 1.5, 'The uniform zero-shot temperature of the NoPE row.')
  flags.DEFINE_bool('fast_eval', True, 'No passkey, fewer documents for the curves (the table needs neither).')
  app.run(main, flags_parser=cli.parse_flags)  # Also host.keep_cpu_buffers(), before jax starts.
