"""Loss by position band of every temperature form, over seeds: the tiny model (L = 64).

  .venv/bin/python bench/temperature_schedules.py --root runs/temperatures --out runs/temperatures/bands.json

Reads the workdirs ROOT/<form>_s<seed> that hold a finished run (see `FORMS`) and, for each base
model, also scores zero-shot forms that need no training (a uniform c = 1.5; log-n scaling, the
log schedule with c = 1 and a = 1 / ln L). Each model reads the first `--documents` test-split
files that have 16L + 1 bytes, 16L at once (position i sees the file's bytes 0..i), and the
next-byte loss is averaged in bands 0-L, L-2L, 2L-4L, 4L-8L and 8L-16L
(evaluate.entropy.position_stats, as `python -m nopejax.evaluate` reports it). Prints a markdown
table of mean and sample standard deviation over seeds, then one of how many seeds beat the
constant search at 16L (same seed) in each band past L, and writes every run's bands to --out (and
each beside its run, read back the next time instead of computed again). --taus adds where each searched form
sharpens: its mean temperature by layer and octave past L. --fit fits the ramp searches' paired
differences as linear in their target lengths' shares and ranks the weightings it predicts best.
The commands that make the runs, and the figures: docs/benchmarks.md.
"""
import argparse
import itertools
import json
import math
import os
import pathlib
import re
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import nopejax  # noqa: E402
from nopejax import attention, checkpoint, data  # noqa: E402
from nopejax.evaluate import entropy, workdir as evaluate_workdir  # noqa: E402
from nopejax.model import Transformer  # noqa: E402

# (form, workdir prefix, what it is); a workdir is PREFIX_s<seed>.
FORMS = (
    ('base', 'base', 'NoPE pretrained plainly (configs/tiny.py), temperature 1'),
    ('uniform c=1.5', 'base', 'the base model with every temperature 1.5, zero-shot'),
    ('log-n', 'base', 'the base model with tau = max(1, 1 + ln(i/L) / ln L), zero-shot (log with c=1, a=1/ln L)'),
    ('constant searched at 16L', 'cs16', 'per-head c_h, 100 steps at 1024 (configs/tiny_search.py, seq_len 1024)'),
    ('constant searched at 16L, applied beyond L only', 'cs16',
     'the searched c_h for queries past L, 1 within L, zero-shot (log with c = c_h, a = 0)'),
    ('log searched over 2L-16L', 'mix', 'per-head c_h, a_h, 100 steps over 128/256/512/1024 (configs/tiny_search_mix.py)'),
    ('log, a_h >= 0, searched over 2L-16L', 'mixpos', 'as mix, with search.min_slope=0 (tau >= 1 past L)'),
    ('log, a_h >= 0, searched over 2L-16L, 8L and 16L twice', 'mixlong',
     'as mixpos, with search.lengths=(128,256,512,512,1024,1024)'),
    ('log searched over 4L-16L', 'mix4', 'as mix, with search.lengths=(256,512,1024): weight moved from L-2L to 2L-8L'),
    ("log from the constant search's c_h, searched over 4L-16L", 'ws4',
     'as mix4, starting at cs16_sN\'s c_h and a_h = 0 (search.init_from)'),
    ('constant searched at 16L, 200 steps', 'cs16x200', 'as cs16, 200 steps (warmup 20), the paper\'s count'),
    ('log searched over 2L-16L, 200 steps', 'mix200', 'as mix, 200 steps (warmup 20)'),
    ('constant searched at 16L, applied beyond L only, 200 steps', 'cs16x200',
     "cs16x200's c_h for queries past L, 1 within L, zero-shot"),
    ('constant searched at 16L, 400 steps', 'cs16x400', 'as cs16, 400 steps (warmup 40)'),
    ('log searched over 2L-16L, 400 steps', 'mix400', 'as mix, 400 steps (warmup 40)'),
    ('log searched at 8L only', 'log8', 'as mix, with search.lengths=(512,): every band up to 8L, 4L-8L half the weight'),
    ('log with 1 only within L/2, searched over 2L-16L', 'logh',
     'as mix, with model.temperature_length=32: queries at L/2-L scaled too, so not the base within L'),
    ('log with 1 only within L/2, searched over 2L-16L, 200 steps', 'logh200', 'as logh, 200 steps (warmup 20)'),
    ('log with 1 only within 3L/4, searched over 2L-16L, 200 steps', 'logq200',
     'as logh200, with model.temperature_length=48'),
    ('log, one slope per layer, searched over 2L-16L, 200 steps', 'share200',
     'as mix200, with search.share_slopes=True: a_h the mean over the layer\'s heads after each update'),
    ('log, a slope per octave (a learned ramp), searched over 2L-16L, 200 steps', 'ramp200',
     'as mix200, with model.temperature_octaves=4: slopes for L-2L, 2L-4L, 4L-8L and beyond 8L'),
    ('log, a slope per octave, searched over 2L-16L with 8L twice, 200 steps', 'ramp8w200',
     'as ramp200, with search.lengths=(128,256,512,512,1024): the band it loses weighted more'),
    ('log, a slope per octave, searched over 2L-16L, 400 steps', 'ramp400', 'as ramp200, 400 steps (warmup 40)'),
    ('log, a slope per octave, searched over 2L-16L with 8L and 16L twice, 200 steps', 'ramp816w200',
     'as ramp200, with search.lengths=(128,256,512,512,1024,1024)'),
    ('log, a slope per octave, searched at 16L only, 200 steps', 'ramp16x200',
     "as ramp200, with search.lengths=(1024,): the constant search's own objective"),
    ('log, a slope per octave, searched over 2L-16L with 16L twice (each band past L a fifth), 200 steps',
     'rampeq200', 'as ramp200, with search.lengths=(128,256,512,1024,1024)'),
    ('log, a slope per octave, searched over 4L-16L with 16L twice, 200 steps', 'rampmid200',
     'as ramp200, with search.lengths=(256,512,1024,1024)'),
    ('log, a slope per octave, searched over 4L-16L with 16L three times, 200 steps', 'ramp4x16w200',
     'as ramp200, with search.lengths=(256,1024,1024,1024)'),
    ('log, a slope per octave, searched over 8L-16L, 200 steps', 'ramp8x16200',
     'as ramp200, with search.lengths=(512,1024): 4L-8L the largest weight'),
    ('log, a value per octave (steps), searched over 2L-16L with 16L twice, 200 steps', 'stepeq200',
     'as rampeq200, with model.temperature_octave_shape=step: tau = c_h + a_h,k throughout octave k'),
    ('log, a value per octave (steps), searched over 2L-16L with 8L twice, 200 steps', 'step8w200',
     'as ramp8w200, with model.temperature_octave_shape=step'),
    ('log, a value per octave (steps), searched at 16L only, 200 steps', 'step16x200',
     'as ramp16x200, with model.temperature_octave_shape=step'),
    ('log, a slope per octave, from the best uniform c past L, searched over 2L-16L with 8L twice, 200 steps',
     'rampauto200', 'as ramp8w200, with search.init=auto over (1.0,1.2,1.4,1.6,1.8): c_h starts where the '
     'constant search starts'),
    ('log, a slope per octave, searched over 2L-16L with 8L four times and 16L twice, 200 steps', 'ramp1142w200',
     'as ramp8w200, with search.lengths=(128,256,512,512,512,512,1024,1024): the weighting --fit ranks first '
     'over the ramp weightings above'),
    ('log, a slope per octave, searched over 2L-16L with 8L and 16L three times, 200 steps', 'ramp1133w200',
     'as ramp8w200, with search.lengths=(128,256,512,512,512,1024,1024,1024): the fit\'s second'),
    ('log, a slope per octave, searched over 2L-16L with 8L and 16L four times, 200 steps', 'ramp1144w200',
     'as ramp8w200, with search.lengths=(128,256,512 x4,1024 x4): the refit\'s first, with the two above added'),
    ('log, a slope per octave, searched over 2L-16L with 8L five times and 16L three times, 200 steps', 'ramp1153w200',
     'as ramp8w200, with search.lengths=(128,256,512 x5,1024 x3): the refit\'s third'),
    ('learned constant', 'lt_const', 'pretrained with trainable c_h (configs/tiny_learned_temperature.py)'),
    ('learned log (L=16)', 'lt_log', 'pretrained with trainable c_h, a_h beyond 16'),
    ('learned ssmax', 'lt_ssmax', 'pretrained with trainable s_h, tau = s_h ln i'),
)
CONSTANT = 'constant searched at 16L'


def comparator(form: str) -> str:
  """The constant search a form is counted against: the one with the steps its name ends with
  (', 200 steps'), else CONSTANT (100 steps)."""
  steps = re.search(r', (\d+) steps$', form)
  return f'{CONSTANT}, {steps.group(1)} steps' if steps else CONSTANT


def finished(workdir: pathlib.Path) -> bool:
  if not (workdir / 'config.json').exists():
    return False
  step = checkpoint.latest_step(str(workdir))
  cfg = json.loads((workdir / 'config.json').read_text())
  return step is not None and step == cfg['train']['steps']


def with_log_schedule(model, cfg, pretrain_length, c_of_layer, a):
  """The loaded constant-schedule model as a log-schedule one: tau = 1 up to L, c + a ln(i / L) beyond,
  with c_of_layer(layer, block) the c_h of each layer (a number or [heads])."""
  cfg = cfg.copy_and_resolve_references()
  cfg.model.temperature_schedule, cfg.model.temperature_length = 'log', pretrain_length
  log_model = Transformer(cfg, nnx.Rngs(0))
  nnx.update(log_model, nnx.state(model))
  for layer, (block, source) in enumerate(zip(log_model.blocks, model.blocks)):
    block.attention.temperature[...] = jnp.broadcast_to(c_of_layer(layer, source), (cfg.model.num_heads,))
    block.attention.temperature_slope[...] = jnp.full_like(block.attention.temperature_slope[...], a)
  return log_model


def models_of(form, workdir, pretrain_length):
  if form == 'uniform c=1.5':
    return nopejax.load(str(workdir), 1.5)[0]
  model, cfg = nopejax.load(str(workdir))
  if form == 'log-n':
    return with_log_schedule(model, cfg, pretrain_length, lambda layer, block: 1.0, 1.0 / math.log(pretrain_length))
  if 'beyond L only' in form:
    return with_log_schedule(model, cfg, pretrain_length, lambda layer, block: block.attention.temperature[...], 0.0)
  return model


def taus_by_octave(model, pretrain_length, octaves=4):
  """tau_LxO: each layer's query temperature at the geometric middle of each octave past L (i = L 2^(k + 1/2)),
  the mean over its heads."""
  positions_1xO = jnp.array([[round(pretrain_length * 2 ** (k + 0.5)) - 1 for k in range(octaves)]])
  rows = []
  for block in model.blocks:
    a = block.attention
    slope = a.temperature_slope[...] if a.schedule == 'log' else None
    tau_1xOxH = attention.query_temperatures(a.schedule, positions_1xO, a.schedule_length, a.temperature[...],
                                             slope, a.octave_shape)
    rows.append(np.broadcast_to(np.asarray(tau_1xOxH), (1, octaves, a.num_heads))[0].mean(axis=-1))
  return np.stack(rows)


def fit_length_weights(paired, root, seed, bands, pretrain_length, most=10, shown=5):
  """Fits each band's mean paired difference (form minus constant search) as linear in the share of
  each target length in the ramp searches' search.lengths (ramp octaves, c_h from search.init, the
  constant search's steps), then prints the fit and the weightings of at most `most` lengths with the
  lowest predicted worst band: where to search next for one that is ahead in every band."""
  targets = [pretrain_length * 2 ** k for k in range(1, len(bands) + 1)]
  shares, diffs = [], []
  for form, prefix, _ in FORMS:
    config_path = root / f'{prefix}_s{seed}' / 'config.json'
    if form not in paired or not config_path.exists():
      continue
    cfg = json.loads(config_path.read_text())
    lengths = cfg['search']['lengths']
    if (cfg['model']['temperature_octaves'] != len(bands) or cfg['model']['temperature_octave_shape'] != 'ramp'
        or cfg['search']['init'] == 'auto' or cfg['search']['init_from'] or not set(lengths) <= set(targets)):
      continue
    shares.append([lengths.count(n) / len(lengths) for n in targets])
    diffs.append(paired[form])
    print(f'fit row: {form}: lengths {tuple(lengths)}, difference {np.round(paired[form], 3).tolist()}')
  if len(shares) <= len(targets):
    print(f'\n--fit needs more than {len(targets)} ramp weightings with paired differences; found {len(shares)}.')
    return
  coef_NxB, *_ = np.linalg.lstsq(np.array(shares), np.array(diffs), rcond=None)
  residual = np.abs(np.array(shares) @ coef_NxB - np.array(diffs)).max()
  print(f'\nLinear fit over {len(shares)} weightings (largest residual {residual:.3f}); predicted difference by '
        f'band for the weightings of up to {most} lengths {tuple(targets)} with the lowest worst band:\n')
  print('| counts of ' + ', '.join(map(str, targets)) + ' | ' + ' | '.join(bands) + ' |\n|---|' + '---|' * len(bands))
  ranked = []
  for counts in itertools.product(range(most + 1), repeat=len(targets)):
    if 0 < sum(counts) <= most and math.gcd(*counts) == 1:
      predicted_B = (np.array(counts) / sum(counts)) @ coef_NxB
      ranked.append((predicted_B.max(), counts, predicted_B))
  for _, counts, predicted_B in sorted(ranked, key=lambda row: row[0])[:shown]:
    print(f'| {counts} | ' + ' | '.join(f'{d:+.3f}' for d in predicted_B) + ' |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--root', default='runs/temperatures')
  parser.add_argument('--out', default='')
  parser.add_argument('--length', type=int, default=16 * 64)
  parser.add_argument('--pretrain_length', type=int, default=64)
  parser.add_argument('--documents', type=int, default=64)
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--taus', action='store_true', help='also print each searched form\'s temperature per layer '
                      'and octave past L, the mean over heads and seeds')
  parser.add_argument('--fit', action='store_true', help='also fit the ramp searches\' band differences as linear in '
                      'their search.lengths shares and rank the weightings it predicts best')
  args = parser.parse_args()
  root = pathlib.Path(args.root)
  documents = None
  runs = {}
  for form, prefix, _ in FORMS:
    for seed in args.seeds:
      workdir = root / f'{prefix}_s{seed}'
      if not finished(workdir):
        continue
      # Each run's bands are kept beside it, so this can run as runs finish and again at the end.
      cached = workdir / f'bands_{"".join(ch if ch.isalnum() else "_" for ch in form)}_{args.documents}.json'
      if cached.exists():
        bands = json.loads(cached.read_text())
      else:
        model = models_of(form, workdir, args.pretrain_length)
        if documents is None:
          documents = evaluate_workdir._CachedDocuments(data.documents(nopejax.load(str(workdir))[1], 'test'))
        stats = entropy.position_stats(model, documents, args.length, args.documents, 1, 8, 256)
        bands = entropy.band_means(stats['loss_by_position'], args.pretrain_length)
        cached.write_text(json.dumps(bands))
      runs.setdefault(form, {})[seed] = bands
      print(form, seed, {k: round(v, 4) for k, v in bands.items()}, flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(runs, indent=1))
  bands = list(next(iter(next(iter(runs.values())).values())))
  print('\n| form | seeds | ' + ' | '.join(bands) + ' |\n|---|---|' + '---|' * len(bands))
  for form, by_seed in runs.items():
    values = np.array([[by_seed[s][b] for b in bands] for s in sorted(by_seed)])
    if len(values) > 1:
      cells = [f'{m:.3f} ± {s:.3f}' for m, s in zip(values.mean(axis=0), values.std(axis=0, ddof=1))]
    else:
      cells = [f'{m:.3f}' for m in values[0]]
    print(f'| {form} | {len(values)} | ' + ' | '.join(cells) + ' |')
  # Seed by seed against the constant search at 16L (same steps), in each band past L: wins / seeds compared.
  print(f'\nSeeds with a lower loss than {CONSTANT!r} (same seed; with as many steps where the form names them) / '
        'seeds compared:\n')
  print('| form | ' + ' | '.join(bands[1:]) + ' |\n|---|' + '---|' * (len(bands) - 1))
  for form, by_seed in runs.items():
    constant = runs.get(comparator(form), {})
    seeds = [s for s in by_seed if s in constant]
    if form not in (CONSTANT, comparator(form)) and seeds:  # Not a constant search itself.
      wins = [sum(by_seed[s][b] < constant[s][b] for s in seeds) for b in bands[1:]]
      print(f'| {form} | ' + ' | '.join(f'{w}/{len(seeds)}' for w in wins) + ' |')
  # The same pairs as numbers: the seeds share a base model, so the base's spread cancels and what is
  # left is the form's own (and the two searches' run-to-run) spread.
  print(f'\nLoss minus that of {CONSTANT!r} (same seed, same steps), mean ± standard error over the seeds '
        '(negative: the form is ahead):\n')
  print('| form | seeds | ' + ' | '.join(bands[1:]) + ' |\n|---|---|' + '---|' * (len(bands) - 1))
  paired = {}
  for form, by_seed in runs.items():
    constant = runs.get(comparator(form), {})
    seeds = [s for s in sorted(by_seed) if s in constant]
    if form not in (CONSTANT, comparator(form)) and len(seeds) > 1:
      diff_SxB = np.array([[by_seed[s][b] - constant[s][b] for b in bands[1:]] for s in seeds])
      paired[form] = diff_SxB.mean(axis=0)
      se_B = diff_SxB.std(axis=0, ddof=1) / math.sqrt(len(seeds))
      print(f'| {form} | {len(seeds)} | ' + ' | '.join(f'{m:+.3f} ± {e:.3f}' for m, e in zip(diff_SxB.mean(axis=0), se_B))
            + ' |')
  if args.fit:
    fit_length_weights(paired, root, args.seeds[0], bands[1:], args.pretrain_length)
  if args.taus:  # Where each form sharpens: the mean tau by layer (rows) and octave past L (columns).
    octaves = [f'{args.pretrain_length * 2 ** k}-{args.pretrain_length * 2 ** (k + 1)}' for k in range(4)]
    print('\nMean query temperature over heads and seeds at the middle of each octave past L, layer by layer:\n')
    print('| form | layer | ' + ' | '.join(octaves) + ' |\n|---|---|' + '---|' * len(octaves))
    for form, prefix, _ in FORMS:
      if form in runs and prefix != 'base':
        tau_SxLxO = np.stack([taus_by_octave(models_of(form, root / f'{prefix}_s{seed}', args.pretrain_length),
                                             args.pretrain_length) for seed in sorted(runs[form])])
        for layer, tau_O in enumerate(tau_SxLxO.mean(axis=0)):
          print(f'| {form} | {layer} | ' + ' | '.join(f'{t:.2f}' for t in tau_O) + ' |')


if __name__ == '__main__':
  main()
