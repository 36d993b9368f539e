"""The documents against the repository: every link and every repository path they name exists, the
README's commands run, and no page or docstring carries the history of how a result was found."""
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))

# Where prose lives, by area: its files, and whether only comments and strings count (Python) or all text.
AREAS = {
    'README.md and docs': PAGES,
    'nopejax': sorted((ROOT / 'nopejax').rglob('*.py')),
    'configs': sorted((ROOT / 'configs').glob('*.py')),
    'bench': sorted(p for p in (ROOT / 'bench').glob('*') if p.is_file() and p.suffix in ('.py', '.md')),
    'launch': sorted(p for p in (ROOT / 'launch').glob('*') if p.is_file()),
}

FENCE = re.compile(r'^\s*(```|~~~).*?^\s*\1[^\n]*$', re.M | re.S)
LINK = re.compile(r'!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
# A repository path: one of the top-level folders, then a path. Not part of a longer path or URL.
REPO_PATH = re.compile(r'(?<![\w./~@:-])((?:docs|configs|bench|launch|nopejax|tests)/[\w./-]*)')
# A page named without its folder, as the code cites them ("method.md, section 3"): a page of docs/.
BARE_PAGE = re.compile(r'(?<![\w./~@:-])([\w-]+\.md)\b')
# Files the code writes into run directories, not pages of the repository.
NOT_PAGES = {'README.md', 'report.md', 'compare.md'}

HISTORY = {
    'an issue number': re.compile(r'\b[Ii]ssues? #?\d+\b|(?<![\w&/#])#\d{1,5}\b(?![\w-])'),
    'a date': re.compile(r'\b20\d\d-[01]\d-[0-3]\d\b'),
    'UTC': re.compile(r'\bUTC\b'),
    'a machine path': re.compile(r'(?<![\w.~/:-])/(?:work|root|tmp|home)/'),
}


def _rel(path):
  return path.relative_to(ROOT).as_posix()


def _comment(line):
  """The comment of a shell line: from a `#` at its start or after a space (not `$#` or `${#x}`)."""
  m = re.search(r'(?:^|\s)#(.*)', line)
  return m.group(1) if m else ''


def _prose(path, code_too=False):
  """(where, text) of what a file says to readers: a page's text; a Python file's comments and strings;
  a shell script's comments and a notebook's markdown and comments (all their text with code_too)."""
  text = path.read_text(encoding='utf-8')
  if path.suffix == '.py':
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
      if tok.type in (tokenize.COMMENT, tokenize.STRING):
        out += [(tok.start[0] + i, line) for i, line in enumerate(tok.string.splitlines())]
    return out
  if path.suffix == '.ipynb':
    out = []
    for n, cell in enumerate(json.loads(text)['cells']):
      source = cell['source'] if isinstance(cell['source'], str) else ''.join(cell['source'])
      for i, line in enumerate(source.splitlines(), 1):
        out.append((f'cell {n} line {i}', line if cell['cell_type'] == 'markdown' or code_too else _comment(line)))
    return out
  lines = text.splitlines()
  if path.suffix == '.md' or code_too:
    return list(enumerate(lines, 1))
  return [(i, _comment(line)) for i, line in enumerate(lines, 1)]


def _heading_anchors(page):
  """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
  anchors = set()
  for line in FENCE.sub('', page.read_text(encoding='utf-8')).splitlines():
    if m := re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line):
      slug = re.sub(r'[^\w\- ]', '', m.group(1).strip().lower()).replace(' ', '-')
      anchors.add(slug)
  return anchors


# ---------------------------------------------------------------------------------------------
# (a) Links.


@pytest.mark.parametrize('page', PAGES, ids=_rel)
def test_every_relative_link_points_at_a_file_that_exists(page):
  broken = []
  for target in LINK.findall(FENCE.sub('', page.read_text(encoding='utf-8'))):
    if re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition('#')
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.exists():
      broken.append(f'{target}: no such file')
    elif anchor and resolved.suffix == '.md' and anchor not in _heading_anchors(resolved):
      broken.append(f'{target}: no heading with that anchor')
  assert not broken, f'{_rel(page)} links to: ' + '; '.join(broken)


# ---------------------------------------------------------------------------------------------
# (b) Repository paths named in prose.


# What a named path ends with to be checked: a folder's `/`, or a file type of this repository. Other
# matches are not paths: `nopejax/torch` (a ratio), `bench/common.time_steps` (a function).
CHECKED_SUFFIX = re.compile(r'(/|\.(py|md|sh|ipynb|png|json|jsonl|txt|toml|model))$')


def _missing_paths(path):
  missing = []
  for where, line in _prose(path):
    for m in REPO_PATH.finditer(line):
      named = m.group(1).rstrip('.-')
      if line[m.end():m.end() + 1] in ('*', '{', '<', '[', '$') or not CHECKED_SUFFIX.search(named):
        continue  # A pattern (bench/*.py, configs/{name}.py), or not a path.
      if any(re.fullmatch(r'[A-Z][A-Z_]*', part) for part in pathlib.PurePosixPath(named).with_suffix('').parts):
        continue  # A placeholder: configs/NAME.py, bench/X.py.
      if not (ROOT / named).exists():
        missing.append(f'{_rel(path)}:{where}: {named}')
    for m in BARE_PAGE.finditer(line):
      if m.group(1) not in NOT_PAGES and not (ROOT / 'docs' / m.group(1)).exists():
        missing.append(f'{_rel(path)}:{where}: {m.group(1)} (as docs/{m.group(1)})')
  return missing


@pytest.mark.parametrize('area', AREAS)
def test_every_repository_path_named_in_prose_exists(area):
  missing = [entry for path in AREAS[area] for entry in _missing_paths(path)]
  assert not missing, f'{len(missing)} named paths do not exist:\n' + '\n'.join(missing)


# ---------------------------------------------------------------------------------------------
# (c) The README's commands.


def _readme_commands():
  """Every `python -m nopejax.X ...` command line of README.md: in code blocks and inline code."""
  text = (ROOT / 'README.md').read_text(encoding='utf-8')
  pieces = [block.group(0) for block in FENCE.finditer(text)]
  pieces += re.findall(r'`([^`\n]+)`', FENCE.sub('', text))
  commands = []
  for piece in pieces:
    for line in re.sub(r'\\\n\s*', ' ', piece).splitlines():
      if m := re.search(r'python -m (nopejax\.[\w.]+)(.*)', line):
        commands.append((m.group(1), m.group(2)))
  return commands


COMMANDS = _readme_commands()
MODULES = sorted({module for module, _ in COMMANDS})


def _module_path(module):
  parts = module.split('.')
  for path in (ROOT.joinpath(*parts).with_suffix('.py'), ROOT.joinpath(*parts, '__main__.py')):
    if path.is_file():
      return path
  return None


def test_readme_names_commands():
  assert {'nopejax.train', 'nopejax.evaluate'} <= set(MODULES), MODULES


@pytest.mark.parametrize('module,args', COMMANDS, ids=[f'{m}{a[:40]}' for m, a in COMMANDS])
def test_readme_command_names_a_module_and_a_config_that_exist(module, args):
  assert _module_path(module), f'README.md runs `python -m {module}`, but it has no {module.replace(".", "/")}.py or __main__.py'
  for config in re.findall(r'--config(?:=|\s+)(?!\.)(\S+)', args):
    config = config.strip('\'"').split(':')[0]
    assert (ROOT / config).is_file(), f'README.md runs `python -m {module}` with --config {config}, which does not exist'


@pytest.mark.parametrize('module', MODULES)
def test_readme_command_help_exits_0(module):
  """`--help` prints the module's usage and exits 0. absl's own --help and --helpfull exit 1 (absl.app's
  HelpFlag), so an absl command line has to turn a help it was asked for into exit 0 itself."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  result = subprocess.run([sys.executable, '-m', module, '--help'], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert result.stdout.strip(), f'`python -m {module} --help` printed nothing on stdout'
  assert result.returncode == 0, (f'`python -m {module} --help` printed its usage but exited {result.returncode}')


# ---------------------------------------------------------------------------------------------
# (d) No history: issue numbers, dates and times of runs, the machine paths runs were made in.


@pytest.mark.parametrize('area', AREAS)
def test_no_run_history_in_prose(area):
  found = []
  for path in AREAS[area]:
    for where, line in _prose(path, code_too=True):
      for what, pattern in HISTORY.items():
        for m in pattern.finditer(line):
          found.append(f'{_rel(path)}:{where}: {what}: {m.group(0)!r} in {line.strip()[:100]!r}')
  assert not found, f'{len(found)} traces of history:\n' + '\n'.join(found)
