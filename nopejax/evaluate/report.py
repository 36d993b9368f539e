"""What an evaluation writes besides results.json: its PNG plots and report.md; and the comparison of
evaluated runs (compare.png, compare.md, compare.json)."""
import json
import math

import numpy as np
from etils import epath

from nopejax import paths
from nopejax.config import ConfigError


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def smooth(values, window: int) -> np.ndarray:
  """Centered moving average over `window` positions, shrinking at the ends (no padding bias)."""
  values = np.asarray(values, np.float64)
  if window <= 1 or len(values) == 0:
    return values
  sums = np.concatenate([[0.0], np.cumsum(values)])
  index = np.arange(len(values))
  low = np.maximum(0, index - window // 2)
  high = np.minimum(len(values), index + window - window // 2)
  return (sums[high] - sums[low]) / (high - low)


def smoothing_window(n: int) -> int:
  """The moving-average width of the position plots: 2% of the curve."""
  return max(1, n // 50)


def _length_axes(ax, lengths, values):
  """Log-2 x axis ticked at the lengths; log y only when the values span more than 10x."""
  ax.set_xscale('log', base=2)
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.minorticks_off()
  finite = [v for v in values if v is not None and np.isfinite(v)]
  if finite and max(finite) > 10 * min(finite):
    ax.set_yscale('log')


def _mark_lengths(ax, results, vertical=True):
  for key, style in (('pretrain_length', '--'), ('search_length', ':')):
    if results.get(key):
      (ax.axvline if vertical else ax.axhline)(results[key], color='gray', linestyle=style, linewidth=1,
                                               label=key.replace('_', ' '))


def _save_png(fig, path) -> None:
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=110)


def write_plots(results, entropy_LxHxN, out) -> list[str]:
  """The PNG files of one evaluation, written into `out` (a path or URL); returns their names."""
  plt = _pyplot()
  written = []

  def save(fig, name):
    _save_png(fig, epath.Path(out) / name)
    plt.close(fig)
    written.append(name)

  lengths = results['lengths']
  ppl = [results['perplexity'][str(n)] for n in lengths]
  fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
  ax.plot(lengths, [np.nan if p is None else p for p in ppl], 'o-')
  _length_axes(ax, lengths, ppl)
  ax.set(xlabel='window length n (tokens)', ylabel='perplexity',
         title=f'Sliding-window perplexity (stride {results["stride"]})')
  _mark_lengths(ax, results)
  ax.legend(fontsize=8)
  save(fig, 'perplexity.png')

  loss = results['loss_by_position']
  if loss:
    window = smoothing_window(len(loss))
    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    ax.plot(np.arange(1, len(loss) + 1), smooth(loss, window))
    ax.set(xlabel='token position (context length)', ylabel='next-token loss (nats)',
           title=f'Loss by position, {results["position_documents"]} documents, moving average {window}')
    _mark_lengths(ax, results)
    ax.legend(fontsize=8)
    save(fig, 'loss_by_position.png')

  if entropy_LxHxN.size:
    L, H, N = entropy_LxHxN.shape
    positions = np.arange(1, N + 1)
    fig, (ax, ax_layers) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    ax.plot(positions, entropy_LxHxN.mean(axis=(0, 1)), label='mean over layers and heads')
    ax.plot(positions, np.log(positions), 'k--', linewidth=1, label='ln i (uniform attention)')
    _mark_lengths(ax, results)
    ax.set(xlabel='query position i', ylabel='attention entropy (nats)',
           title=f'Attention entropy, {results["entropy_documents"]} documents')
    ax.legend(fontsize=8)
    colors = plt.cm.viridis(np.linspace(0, 1, L))
    for layer in range(L):
      ax_layers.plot(positions, entropy_LxHxN[layer].mean(axis=0), color=colors[layer], label=f'layer {layer}')
    ax_layers.plot(positions, np.log(positions), 'k--', linewidth=1)
    ax_layers.set(xlabel='query position i', ylabel='entropy (nats), mean over heads', title='By layer')
    if L <= 12:
      ax_layers.legend(fontsize=7)
    save(fig, 'entropy.png')

    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.4 * H), max(3.0, 1.2 + 0.35 * L)), constrained_layout=True)
    image = ax.imshow(entropy_LxHxN[:, :, -1], cmap='magma', aspect='auto')
    ax.set(xlabel='head', ylabel='layer',
           title=f'Entropy at the last position {N}\n(upper bound ln {N} = {math.log(N):.2f})')
    fig.colorbar(image, ax=ax, label='nats')
    save(fig, 'entropy_heatmap.png')

    if results['kind'] == 'search':
      columns = min(L, 6)
      rows = -(-L // columns)
      fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.4 * rows), squeeze=False,
                               constrained_layout=True)
      temperatures = np.asarray(results['temperatures'])
      for layer, ax in enumerate(axes.flat):
        if layer >= L:
          ax.axis('off')
          continue
        ax.scatter(entropy_LxHxN[layer, :, -1], temperatures[layer], s=14)
        ax.set_title(f'layer {layer}', fontsize=9)
        ax.set_xlabel('entropy at last position', fontsize=8)
        ax.set_ylabel('temperature c_h', fontsize=8)
      fig.suptitle('Searched temperature against attention entropy, per head')
      save(fig, 'temperature_entropy.png')

  detail = {n: d for n, d in results['passkey_detail'].items() if d}
  if detail:
    depths = list(next(iter(detail.values()))['by_depth'])
    grid = np.array([[results['passkey_detail'][str(n)]['by_depth'][d] if results['passkey_detail'][str(n)]
                      else np.nan for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(lengths), 1.2 + 0.3 * len(depths)), constrained_layout=True)
    image = ax.imshow(grid, cmap='RdYlGn', vmin=0, vmax=1, aspect='auto')
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f'{d}%' for d in depths])
    for column, n in enumerate(lengths):
      if not results['passkey_detail'][str(n)]:
        ax.text(column, (len(depths) - 1) / 2, 'prompt\ndoes not\nfit', ha='center', va='center', fontsize=8)
    ax.set(xlabel='length (tokens)', ylabel='needle depth', title='Passkey retrieval accuracy')
    fig.colorbar(image, ax=ax)
    save(fig, 'passkey.png')

  if any(v is not None for by_length in results.get('ruler', {}).values() for v in by_length.values()):
    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    for task, by_length in results['ruler'].items():
      ax.plot(lengths, [np.nan if by_length.get(str(n)) is None else by_length[str(n)] for n in lengths], 'o-',
              label=task)
    _length_axes(ax, lengths, [])
    ax.set(xlabel='length (tokens)', ylabel='accuracy', ylim=(-0.05, 1.05), title='RULER tasks')
    _mark_lengths(ax, results)
    ax.legend(fontsize=8)
    save(fig, 'ruler.png')
  return written


def _number(value, digits=3):
  return 'n/a' if value is None else f'{value:.{digits}f}'


def write_report(results, out) -> None:
  """report.md: what was evaluated, the tables, and every plot embedded."""
  lengths = [str(n) for n in results['lengths']]
  lines = [f'# Evaluation of {results["label"]}', '',
           f'- workdir: `{results["workdir"]}` ({results["kind"]}, step {results["step"]})',
           f'- pretraining length: {results["pretrain_length"]}'
           + (f'; searched at length {results["search_length"]}' if results['search_length'] else ''),
           '- temperature: ' + (f'uniform c = {results["temperature_override"]:g} (override)'
                                 if results['temperature_override'] is not None else 'as trained'),
           f'- data: {results["dataset"]} split `{results["split"]}`; sliding windows with stride {results["stride"]}',
           '', '## Perplexity by length', '',
           '| | ' + ' | '.join(lengths) + ' |', '|---|' + '---|' * len(lengths),
           '| perplexity | ' + ' | '.join(_number(results['perplexity'][n]) for n in lengths) + ' |',
           '| windows | ' + ' | '.join(str(results['perplexity_detail'][n]['windows']) for n in lengths) + ' |', '']
  if results['passkey']:
    lines += ['## Passkey retrieval', '', '| | ' + ' | '.join(lengths) + ' |', '|---|' + '---|' * len(lengths),
              '| accuracy | ' + ' | '.join(_number(results['passkey'].get(n), 2) for n in lengths) + ' |', '',
              'n/a: the prompt template alone is longer than the length.', '']
  if results.get('ruler'):
    lines += ['## RULER tasks (accuracy)', '', '| task | ' + ' | '.join(lengths) + ' |', '|---|' + '---|' * len(lengths)]
    lines += [f'| {task} | ' + ' | '.join(_number(by_length.get(n), 2) for n in lengths) + ' |'
              for task, by_length in results['ruler'].items()]
    lines += ['', 'n/a: the task\'s template alone is longer than the length.', '']
  if results['loss_by_band']:
    bands = list(results['loss_by_band'])
    lines += ['## Loss by position band (nats)', '', '| ' + ' | '.join(bands) + ' |', '|' + '---|' * len(bands),
              '| ' + ' | '.join(_number(results['loss_by_band'][b]) for b in bands) + ' |', '']
  captions = {
      'perplexity.png': 'Sliding-window perplexity by window length.',
      'loss_by_position.png': 'Next-token loss by position, averaged over documents.',
      'entropy.png': 'Attention entropy by query position with its upper bound ln i; right: per layer.',
      'entropy_heatmap.png': 'Entropy of each layer and head at the last position.',
      'temperature_entropy.png': 'Each head\'s searched temperature against its entropy at the last position.',
      'passkey.png': 'Passkey accuracy by needle depth and length.',
      'ruler.png': 'Accuracy of RULER\'s synthetic tasks by length.',
  }
  lines += ['## Plots', '']
  for name in results.get('plots', []):
    lines += [f'![{name}]({name})', '', captions.get(name, ''), '']
  (epath.Path(out) / 'report.md').write_text('\n'.join(lines))


# ---------------------------------------------------------------------------------------------
# Comparing evaluated runs.


def read_results(path) -> dict:
  """results.json from its path, an eval directory, or a workdir (its eval/)."""
  path = paths.resolve(path)
  for candidate in (path, path / 'results.json', path / 'eval' / 'results.json'):
    if candidate.is_file():
      return json.loads(candidate.read_text())
  raise ConfigError(f'{path} holds no results.json (nor eval/results.json); run '
                    f'`python -m nopejax.evaluate --workdir {path}` first.')


def compare(run_dirs, out) -> dict:
  """Overlays perplexity by length and loss by position of evaluated runs: compare.png, compare.md.

  Returns {'runs': labels, 'perplexity': {label: {length: ppl}}, 'passkey': ...}, also written
  as compare.json.
  """
  if not run_dirs:
    raise ConfigError('--compare needs at least one evaluated run; pass their directories after it.')
  runs = [read_results(p) for p in run_dirs]
  labels = []
  for run in runs:
    label = run['label']
    labels.append(label if label not in labels else f'{label} ({len(labels)})')
  lengths = sorted({int(n) for run in runs for n in run['perplexity']})

  plt = _pyplot()
  fig, (ax_ppl, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
  for label, run in zip(labels, runs):
    run_lengths = sorted(int(n) for n in run['perplexity'])
    ax_ppl.plot(run_lengths, [run['perplexity'][str(n)] or np.nan for n in run_lengths], 'o-', label=label)
    loss = run['loss_by_position']
    if loss:
      ax_loss.plot(np.arange(1, len(loss) + 1), smooth(loss, smoothing_window(len(loss))), label=label)
  pretrain_lengths = sorted({run['pretrain_length'] for run in runs})
  for length in pretrain_lengths:
    for ax in (ax_ppl, ax_loss):
      ax.axvline(length, color='gray', linestyle='--', linewidth=1)
  _length_axes(ax_ppl, lengths, [p for run in runs for p in run['perplexity'].values()])
  ax_ppl.set(xlabel='window length n (tokens)', ylabel='perplexity', title='Sliding-window perplexity')
  ax_loss.set(xlabel='token position', ylabel='next-token loss (nats)', title='Loss by position (moving average 2%)')
  ax_ppl.legend(fontsize=8)
  ax_loss.legend(fontsize=8)
  out = paths.resolve(out)
  out.mkdir(parents=True, exist_ok=True)
  _save_png(fig, out / 'compare.png')
  plt.close(fig)

  header = ['| run | ' + ' | '.join(str(n) for n in lengths) + ' |', '|---|' + '---|' * len(lengths)]
  lines = ['# Comparison', '', f'Pretraining length(s): {", ".join(map(str, pretrain_lengths))}.', '',
           '## Sliding-window perplexity', ''] + header
  for label, run in zip(labels, runs):
    lines.append(f'| {label} | ' + ' | '.join(_number(run['perplexity'].get(str(n)), 2) for n in lengths) + ' |')
  lines += ['', '## Passkey accuracy', ''] + header
  for label, run in zip(labels, runs):
    lines.append(f'| {label} | ' + ' | '.join(_number(run['passkey'].get(str(n)), 2) for n in lengths) + ' |')
  bands = list(dict.fromkeys(b for run in runs for b in run.get('loss_by_band', {})))
  if bands:
    lines += ['', '## Loss by position band (nats)', '', '| run | ' + ' | '.join(bands) + ' |',
              '|---|' + '---|' * len(bands)]
    for label, run in zip(labels, runs):
      lines.append(f'| {label} | ' + ' | '.join(_number(run.get('loss_by_band', {}).get(b)) for b in bands) + ' |')
  lines += ['', '![compare.png](compare.png)', '']
  (out / 'compare.md').write_text('\n'.join(lines))
  summary = {'runs': labels, 'sources': [str(paths.resolve(p)) for p in run_dirs],
             'perplexity': {label: run['perplexity'] for label, run in zip(labels, runs)},
             'passkey': {label: run['passkey'] for label, run in zip(labels, runs)},
             'loss_by_band': {label: run.get('loss_by_band', {}) for label, run in zip(labels, runs)}}
  (out / 'compare.json').write_text(json.dumps(summary, indent=1))
  return summary
