"""The catalogue of bad command lines: each is one sentence on stderr (`error: ...`) and exit code 2,
with no traceback and nothing written.

Each case runs the command's own `__main__` code in this process (runpy), with absl's flags defined
afresh for it, so that the whole catalogue takes seconds; a few run as real processes at the end,
to prove the exit code and the closed-off stderr of config.exit_with_sentence.
One line per case: (command, arguments, the sentence's start or a fragment of it, exit code).
{tmp} is a scratch directory holding `file` (a plain file), `empty/` (an empty directory),
`broken.py` (a config file with a syntax error), `prompts.txt` (blank lines only), `cut_run/` (a
workdir whose config.json is cut off) and Hugging Face directories: `lfs/` (a Git LFS pointer for
weights), `garbage/` (weights that are no safetensors), `cut_config/`, `cut_index/` (JSON cut off).
"""
import contextlib
import importlib
import os
import pathlib
import runpy
import subprocess
import sys
import warnings

import pytest
from absl import app, flags
from absl import logging as absl_logging

from nopejax import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {'train': 'nopejax.train', 'plan': 'nopejax.plan', 'prepare': 'nopejax.prepare',
           'compare': 'nopejax.compare', 'evaluate': 'nopejax.evaluate', 'generate': 'nopejax.generate',
           'convert': 'nopejax.convert'}
TINY = ['--config', 'configs/tiny.py']
RUN = ['--workdir', '{tmp}/run']  # Never created: every case fails before anything is written.

CATALOGUE = [
    # train: flags and the config file.
    ('train', [*TINY, *RUN, '--config.train.stepz=5'], 'Unknown config key train.stepz; every key is declared', 2),
    ('train', [*TINY, *RUN, '--config.train.steps=many'], 'flag --config.train.steps=many: invalid literal for int()', 2),
    ('train', [*RUN], 'No --config given; pass one, e.g. --config configs/tiny.py.', 2),
    ('train', ['--config', 'configs/nothing.py', *RUN], 'Cannot load the config file configs/nothing.py', 2),
    ('train', ['--config', '{tmp}/broken.py', *RUN], 'fails at line 2 (SyntaxError: invalid syntax)', 2),
    ('train', [*TINY], 'No --workdir given; pass --workdir DIR for checkpoints and metrics.', 2),
    ('train', [*TINY, *RUN, '--nosuchflag'], 'Unknown command line flag', 2),
    ('train', [*TINY, '--workdir', '{tmp}/file'], '--workdir {tmp}/file is a file, not a directory', 2),
    ('train', [*TINY, '--workdir', '{tmp}/file/run'], '--workdir {tmp}/file/run lies under the file {tmp}/file', 2),
    ('train', [*TINY, *RUN, '--num_processes=2', '--process_id=5', '--coordinator_address=h:1'],
     'do not describe a process of a job', 2),
    # train: each numeric key's range (config_checks.RANGES).
    ('train', [*TINY, *RUN, '--config.model.embed_dim=0'], 'model.embed_dim=0 must be > 0; set it to e.g. 128', 2),
    ('train', [*TINY, '--dry_run', '--config.model.embed_dim=0'], 'model.embed_dim=0 must be > 0', 2),
    ('train', [*TINY, *RUN, '--config.model.num_layers=0'], 'model.num_layers=0 must be > 0', 2),
    ('train', [*TINY, *RUN, '--config.model.mlp_dim=-4'], 'model.mlp_dim=-4 must be > 0', 2),
    ('train', [*TINY, *RUN, '--config.model.num_heads=0'], 'model.num_heads=0 must be > 0', 2),
    ('train', [*TINY, *RUN, '--config.model.vocab_size=0'], 'model.vocab_size=0 must be > 0', 2),
    ('train', [*TINY, *RUN, '--config.model.head_dim=-2'], 'model.head_dim=-2 must be >= 0 (0 = embed_dim // num_heads)', 2),
    ('train', [*TINY, *RUN, '--config.model.temperature=0'], 'model.temperature=0.0 must be a finite number > 0', 2),
    ('train', [*TINY, *RUN, '--config.model.norm_eps=nan'], 'model.norm_eps=nan must be a finite number > 0', 2),
    ('train', [*TINY, *RUN, '--config.model.attention_block=-1'], 'model.attention_block=-1 must be >= 0', 2),
    ('train', [*TINY, *RUN, '--config.data.seq_len=0'], 'data.seq_len=0 must be > 0', 2),
    ('train', [*TINY, *RUN, '--config.data.worker_count=-1'], 'data.worker_count=-1 must be >= 0', 2),
    ('train', [*TINY, *RUN, '--config.data.shuffle_seed=-1'], 'data.shuffle_seed=-1 must be >= 0', 2),
    ('train', [*TINY, *RUN, '--config.train.steps=0'], 'train.steps=0 must be > 0', 2),
    ('train', [*TINY, *RUN, '--config.train.batch_size=0'], 'train.batch_size=0 must be > 0', 2),
    ('train', [*TINY, *RUN, '--config.train.learning_rate=-1'], 'train.learning_rate=-1.0 must be a finite number >= 0', 2),
    ('train', [*TINY, *RUN, '--config.train.learning_rate=nan'], 'train.learning_rate=nan must be a finite number >= 0', 2),
    ('train', [*TINY, *RUN, '--config.train.final_lr_fraction=-3'], 'train.final_lr_fraction=-3.0 must be a finite number in [0, 1]', 2),
    ('train', [*TINY, *RUN, '--config.train.b1=1'], 'train.b1=1.0 must be a finite number in [0, 1)', 2),
    ('train', [*TINY, *RUN, '--config.train.b2=1.5'], 'train.b2=1.5 must be a finite number in [0, 1)', 2),
    ('train', [*TINY, *RUN, '--config.train.eps=0'], 'train.eps=0.0 must be a finite number > 0', 2),
    ('train', [*TINY, *RUN, '--config.train.weight_decay=-0.1'], 'train.weight_decay=-0.1 must be a finite number >= 0', 2),
    ('train', [*TINY, *RUN, '--config.train.clip_norm=-1'], 'train.clip_norm=-1.0 must be a finite number > 0 (0 would', 2),
    ('train', [*TINY, *RUN, '--config.train.warmup_steps=-5'], 'train.warmup_steps=-5 must be >= 0', 2),
    ('train', [*TINY, *RUN, '--config.train.log_every=0'], 'train.log_every=0 must be >= 1', 2),
    ('train', [*TINY, *RUN, '--config.train.eval_batches=0'], 'train.eval_batches=0 must be >= 1', 2),
    ('train', [*TINY, *RUN, '--config.train.keep_checkpoints=0'], 'train.keep_checkpoints=0 must be >= 1', 2),
    ('train', [*TINY, *RUN, '--config.train.skip_nonfinite=-1'], 'train.skip_nonfinite=-1 must be >= 0', 2),
    ('train', [*TINY, *RUN, '--config.train.seed=-1'], 'train.seed=-1 must be >= 0', 2),
    ('train', [*TINY, *RUN, '--config.train.peak_flops_per_device=-1'], 'train.peak_flops_per_device=-1.0 must be', 2),
    ('train', [*TINY, *RUN, '--config.train.temperature.learning_rate=nan'], 'train.temperature.learning_rate=nan must be', 2),
    ('train', [*TINY, *RUN, '--config.train.temperature.clip_norm=0'], 'train.temperature.clip_norm=0.0 must be', 2),
    ('train', [*TINY, *RUN, '--config.mesh.fsdp=0'], 'mesh.fsdp=0 must be >= 1, or -1 for the devices the other axes leave', 2),
    ('train', [*TINY, *RUN, '--config.search.min_temperature=-1'], 'search.min_temperature=-1.0 must be', 2),
    ('train', [*TINY, *RUN, '--config.eval.max_tokens=0'], 'eval.max_tokens=0 must be > 0', 2),
    ('train', [*TINY, *RUN, '--config.eval.stride=-1'], 'eval.stride=-1 must be >= 0', 2),
    ('train', [*TINY, *RUN, '--config.eval.lengths=(0,64)'], 'eval.lengths=(0, 64) must hold only numbers > 0', 2),
    # train: keys together.
    ('train', [*TINY, *RUN, '--config.mesh.data=3'], 'mesh.data=3 mesh.fsdp=1 mesh.tensor=1 uses 3 devices but 8', 2),
    ('train', [*TINY, *RUN, '--config.model.num_heads=3'], 'model.num_heads=3 does not divide model.embed_dim=128', 2),
    ('train', [*TINY, *RUN, '--config.model.num_kv_heads=3'], 'model.num_kv_heads=3 does not divide model.num_heads=4', 2),
    ('train', [*TINY, *RUN, '--config.model.position=t5'], "model.position='t5' is not one of", 2),
    ('train', [*TINY, *RUN, '--config.train.microbatches=3'], 'train.microbatches=3 does not divide train.batch_size', 2),
    ('train', [*TINY, *RUN, '--config.search.init=warm'], "search.init='warm' is neither a finite number nor 'auto'", 2),
    ('train', [*TINY, *RUN, '--config.train.trainable=temperature', '--config.search.init=0.5'],
     'search.init=0.5 is below search.min_temperature=1.0', 2),
    ('train', [*TINY, *RUN, '--config.train.trainable=temperature', '--config.search.init=auto',
               '--config.search.init_candidates=(0.5,1.5)'], 'search.init_candidates=(0.5, 1.5) must be a non-empty list', 2),
    ('train', [*TINY, *RUN, '--config.train.trainable=temperature'], "train.trainable='temperature' needs search.base", 2),
    ('train', [*TINY, *RUN, '--config.train.trainable=temperature', '--config.search.base={tmp}/empty'],
     'search.base={tmp}/empty holds no checkpoint', 2),
    ('train', [*TINY, *RUN, '--config.model.rope_layers=1,0'], "model.rope_layers='1,0' is not one 0 or 1 per layer", 2),
    ('train', [*TINY, *RUN, '--config.data.tokenizer={tmp}/none.model'], "is neither 'byte' nor an existing file", 2),
    ('train', [*TINY, *RUN, '--config.data.dataset=files'], "data.dataset='files' needs data.train_files", 2),
    ('train', [*TINY, *RUN, '--config.data.dataset=files', '--config.data.train_files={tmp}/none*.jsonl'],
     "data.train_files='{tmp}/none*.jsonl' matches no files", 2),
    ('train', [*TINY, *RUN, '--config.data.dataset=wikipedia'], "data.dataset='wikipedia' is not one of", 2),
    ('train', [*TINY, *RUN, '--config.data.dataset=textdir', '--config.data.text_dir={tmp}/none'],
     "data.text_dir='{tmp}/none' is not a directory", 2),
    ('train', [*TINY, *RUN, '--config.data.dataset=textdir', '--config.data.text_dir={tmp}/empty'],
     "data.text_dir='{tmp}/empty' holds no .txt or .jsonl files", 2),
    # plan.
    ('plan', [*TINY, '--config.model.embed_dim=0'], 'model.embed_dim=0 must be > 0', 2),
    ('plan', [*TINY, '--config.train.b2=1.5'], 'train.b2=1.5 must be a finite number in [0, 1)', 2),
    ('plan', [*TINY, '--config.mesh.data=3'], 'mesh.data=3 mesh.fsdp=1 mesh.tensor=1 uses 3 devices', 2),
    ('plan', [*TINY, '--config.nothing=1'], 'Unknown config key nothing', 2),
    ('plan', [*TINY, 'extra'], "Unexpected arguments ['extra']", 2),
    ('train', [*TINY, *RUN, 'extra'], "Unexpected arguments ['extra']", 2),
    ('prepare', [*TINY, '--out', '{tmp}/tokens', '--config.model.embed_dim=0'], 'model.embed_dim=0 must be > 0', 2),
    ('plan', [*TINY, '--buffers=many'], "flag --buffers=many: invalid literal for int()", 2),
    ('plan', [], 'No --config given', 2),
    ('plan', [*TINY, '--topology=v9-8'], '--topology=v9-8 is not a TPU slice name', 2),
    ('plan', [*TINY, '--topology=v5e-3'], '--topology=v5e-3 is no v5e slice', 2),
    # prepare.
    ('prepare', [*TINY], 'No --out given; pass --out DIR for the shards', 2),
    ('prepare', [*TINY, '--out', '{tmp}/out', '--split=test'], 'flag --split=test: value should be one of <train|eval>', 2),
    ('prepare', ['--out', '{tmp}/out'], 'No --config given', 2),
    ('prepare', [*TINY, '--out', '{tmp}/out', '--config.data.tokenizerr=byte'], 'Unknown config key data.tokenizerr', 2),
    ('prepare', [*TINY, '--out', '{tmp}/out'], 'data.train_files is empty; set it to the glob(s)', 2),
    ('prepare', [*TINY, '--out', '{tmp}/out', '--config.data.train_files={tmp}/none*.jsonl'], 'matches no files', 2),
    ('prepare', [*TINY, '--out', '{tmp}/file', '--config.data.train_files={tmp}/prompts.txt'], '--out {tmp}/file cannot be written', 2),
    # compare.
    ('compare', ['--out', '{tmp}/cmp'], 'No --config given', 2),
    ('compare', ['--config', '{tmp}/broken.py', '--out', '{tmp}/cmp'], 'fails at line 2 (SyntaxError', 2),
    ('compare', [*TINY, '--out', '{tmp}/cmp', '--seeds=0'], '--seeds=0 must be at least 1', 2),
    ('compare', [*TINY, '--out', '{tmp}/cmp', '--config.train.learning_rate=-1'], 'train.learning_rate=-1.0 must be', 2),
    ('compare', [*TINY, '--out', '{tmp}/cmp', 'extra'], "Unexpected arguments ['extra']", 2),
    ('compare', ['--config', 'configs/nothing.py', '--out', '{tmp}/cmp'], 'Cannot load the config file configs/nothing.py', 2),
    ('compare', [*TINY, '--out', '{tmp}/file'], '--out {tmp}/file is a file, not a directory', 2),
    ('compare', [*TINY, '--out', '{tmp}/cmp', '--steps=-1'], '--steps=-1 not negative', 2),
    ('compare', [*TINY, '--out', '{tmp}/cmp', '--config.model.nothing=1'], 'Unknown config key model.nothing', 2),
    # evaluate.
    ('evaluate', [], 'No --workdir given; pass --workdir DIR of a trained run', 2),
    ('evaluate', ['--workdir', '{tmp}/run', '--config.eval.lenghts=(16,)'], 'Unknown config key eval.lenghts', 2),
    ('evaluate', ['--workdir', '{tmp}/run', '--config.eval.batch_size=x'], 'flag --config.eval.batch_size=x: invalid literal', 2),
    ('evaluate', ['--workdir', '{tmp}/empty'], 'empty has no config.json, so it is not a nopejax workdir', 2),
    ('evaluate', ['--workdir', '{tmp}/empty', '--out', '{tmp}/file'], '--out {tmp}/file is a file, not a directory', 2),
    ('evaluate', ['--compare', '--out', '{tmp}/file', '{tmp}/empty'], '--out {tmp}/file is a file, not a directory', 2),
    ('evaluate', ['--workdir', '{tmp}/cut_run'], 'cut_run/config.json is not valid JSON', 2),
    ('evaluate', ['--compare', '--workdir', '{tmp}/run'], '--compare reads finished evaluations; drop --workdir', 2),
    ('evaluate', ['--workdir', '{tmp}/run', 'extra'], "Unexpected arguments ['extra']", 2),
    # generate.
    ('generate', ['--prompt', 'x'], 'No --workdir given; pass --workdir DIR of a trained run.', 2),
    ('generate', ['--workdir', '{tmp}/run', '--prompt', 'x', '--batch_size=0'], '--batch_size=0 must be positive', 2),
    ('generate', ['--workdir', '{tmp}/run', '--prompt', 'x', '--top_p=0'], 'top_p=0.0 must be in (0, 1]', 2),
    ('generate', ['--workdir', '{tmp}/run', '--prompt', 'x', '--temperature=-1'], 'temperature=-1.0 must not be negative', 2),
    ('generate', ['--workdir', '{tmp}/run', '--prompt', 'x', '--attention_temperature=0'],
     '--attention_temperature=0.0 must be positive', 2),
    ('generate', ['--workdir', '{tmp}/run'], 'No prompt given; pass --prompt TEXT', 2),
    ('generate', ['--workdir', '{tmp}/run', '--prompts_file', '{tmp}/prompts.txt'], 'holds no prompt', 2),
    ('generate', ['--workdir', '{tmp}/run', '--max_new_tokens=x'], 'invalid literal for int()', 2),
    ('generate', ['--workdir', '{tmp}/empty', '--prompt', 'x'], 'empty has no config.json, so it is not a nopejax workdir', 2),
    ('generate', ['--workdir', '{tmp}/run', '--prompts_file', '{tmp}/none.txt'], 'none.txt does not exist', 2),
    ('generate', ['--workdir', '{tmp}/cut_run', '--prompt', 'x'], 'cut_run/config.json is not valid JSON', 2),
    # convert.
    ('convert', [], 'No command given; pass from-hf or to-hf first', 2),
    ('convert', ['export'], "'export' is not a command", 2),
    ('convert', ['from-hf', '--hf_dir', '{tmp}/hf'], 'No --workdir given; from-hf needs both --hf_dir and --workdir.', 2),
    ('convert', ['to-hf', '--workdir', '{tmp}/run', '--hf_dir', '{tmp}/hf', '--max_shard_mb', '0'],
     '--max_shard_mb 0.0 must be positive', 2),
    ('convert', ['to-hf', '--workdir', '{tmp}/run', '--hf_dir', '{tmp}/hf', '--nope'], 'Unknown command line flag', 2),
    ('convert', ['to-hf', '--workdir', '{tmp}/empty', '--hf_dir', '{tmp}/file'], '--hf_dir {tmp}/file is a file', 2),
    ('convert', ['to-hf', '--workdir', '{tmp}/empty', '--hf_dir', '{tmp}/hf'], 'empty has no config.json', 2),
    ('convert', ['to-hf', '--workdir', '{tmp}/run', '--hf_dir', '{tmp}/hf', '--dtype=int8'], '--dtype int8 is not one of', 2),
    ('convert', ['from-hf', '--hf_dir', '{tmp}/empty', '--workdir', '{tmp}/run'], 'empty has no config.json; point it at', 2),
    ('convert', ['to-hf', '--workdir', '{tmp}/empty', '--hf_dir', '{tmp}/file/hf'], 'lies under the file {tmp}/file', 2),
    ('convert', ['to-hf', '--workdir', '{tmp}/cut_run', '--hf_dir', '{tmp}/hf'], 'cut_run/config.json is not valid JSON', 2),
    ('convert', ['from-hf', '--hf_dir', '{tmp}/lfs', '--workdir', '{tmp}/file'], '--workdir {tmp}/file is a file', 2),
    ('convert', ['from-hf', '--hf_dir', '{tmp}/lfs', '--workdir', '{tmp}/run'], 'model.safetensors is a Git LFS pointer', 2),
    ('convert', ['from-hf', '--hf_dir', '{tmp}/garbage', '--workdir', '{tmp}/run'], 'is not a safetensors file', 2),
    ('convert', ['from-hf', '--hf_dir', '{tmp}/cut_config', '--workdir', '{tmp}/run'], 'config.json is not valid JSON', 2),
    ('convert', ['from-hf', '--hf_dir', '{tmp}/cut_index', '--workdir', '{tmp}/run'], 'is not a safetensors index', 2),
]


@pytest.fixture(scope='module')
def scratch(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('bad_inputs')
  (tmp / 'file').write_text('a plain file')
  (tmp / 'empty').mkdir()
  (tmp / 'broken.py').write_text('from nopejax import config\ndef get_config(:\n  return config.get_config()\n')
  (tmp / 'prompts.txt').write_text('\n\n')
  hf_config = (pathlib.Path(ROOT) / 'tests' / 'fixtures' / 'hf_llama' / 'config.json').read_text()
  for name, files in {
      'cut_run': {'config.json': '{"model": {"vocab'},
      'lfs': {'config.json': hf_config,
              'model.safetensors': 'version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 1234\n'},
      'garbage': {'config.json': hf_config, 'model.safetensors': '\xff' * 64},
      'cut_config': {'config.json': hf_config[:40]},
      'cut_index': {'config.json': hf_config, 'model.safetensors.index.json': '{"weight_map": {"a'}}.items():
    (tmp / name).mkdir()
    for file, text in files.items():
      (tmp / name / file).write_text(text)
  return tmp


def _fill(text, tmp):
  return text.replace('{tmp}', str(tmp))


_OURS = ('nopejax', 'ml_collections')  # Modules whose flags each case defines anew, with every --config*.


@contextlib.contextmanager
def _fresh_flags():
  """absl's global FLAGS without the commands' flags for one case, and as before after it.

  The commands define their flags at import or in `__main__`, and config_flags one flag per
  --config.* override, all on the global FLAGS, so a second command line in one process would find
  them defined: each case gets copies of FLAGS's registries without them. The flags of libraries
  first imported during a case (grain's) are kept afterwards, as their modules stay imported.
  """
  state = flags.FLAGS.__dict__
  saved = dict(state)
  registries = ('__flags_by_module', '__flags_by_module_id', '__key_flags_by_module')

  def ours(state):
    return ({id(f) for module, fs in state['__flags_by_module'].items() if module.startswith(_OURS) for f in fs} |
            {id(f) for name, f in state['__flags'].items() if name.split('.')[0] == 'config'})

  dropped = ours(saved)
  state.update({'__flags': {name: f for name, f in saved['__flags'].items() if id(f) not in dropped},
                '__hiddenflags': set(saved['__hiddenflags']), '__flags_parsed': False,
                **{r: {key: [f for f in fs if id(f) not in dropped] for key, fs in saved[r].items()} for r in registries}})
  try:
    yield
  finally:
    case = dict(state)
    state.clear()
    state.update(saved)
    new = {id(f) for f in case['__flags'].values()} - {id(f) for f in saved['__flags'].values()} - ours(case)
    saved['__flags'].update({name: f for name, f in case['__flags'].items() if id(f) in new})
    for r in registries:
      for key, fs in case[r].items():
        saved[r].setdefault(key, []).extend(f for f in fs if id(f) in new)


def run_in_process(command, args, monkeypatch, capsys):
  """(exit code, stderr) of `python -m MODULE args` run here."""
  import nopejax.cli

  def exit_with_sentence(message, code=2):  # The real one closes stderr's descriptor: pytest's, here.
    print(f'error: {message}', file=sys.stderr)
    sys.exit(code)

  monkeypatch.setattr(config, 'exit_with_sentence', exit_with_sentence)
  monkeypatch.setattr(app._run_init, 'done', True)  # absl's one-time set-up (its log handler) stays undone.
  handler = absl_logging.get_absl_handler()
  monkeypatch.setattr(handler, 'filters', list(handler.filters))  # host.quiet_libraries adds one.
  argv = [MODULES[command], *args]  # absl names the flags `__main__` defines by argv[0]: one of _OURS.
  monkeypatch.setattr(sys, 'argv', argv)
  capsys.readouterr()
  with _fresh_flags(), warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
    warnings.simplefilter('ignore', RuntimeWarning)  # runpy: the module was imported before.
    if command in ('train', 'plan', 'prepare', 'compare'):
      importlib.reload(nopejax.cli)  # Their --config, defined afresh.
    runpy.run_module(MODULES[command], run_name='__main__', alter_sys=False)
  return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize('command, args, message, code', CATALOGUE,
                         ids=[f'{c}:{" ".join(a[2:] if a[:2] == TINY else a)[:60]}' for c, a, _, _ in CATALOGUE])
def test_bad_input_is_one_sentence(command, args, message, code, scratch, monkeypatch, capsys):
  exit_code, stderr = run_in_process(command, [_fill(a, scratch) for a in args], monkeypatch, capsys)
  errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
  assert exit_code == code and len(errors) == 1 and _fill(message, scratch) in errors[0], stderr[-2000:]
  assert 'Traceback' not in stderr
  assert not (scratch / 'run').exists() and not (scratch / 'out').exists() and not (scratch / 'hf').exists()


# The same cases as real processes, all at once: the real exit code, stderr closed off after the
# sentence, and for --dry_run no model printed.
IN_PROCESSES = [
    ('train', [*TINY, '--dry_run', '--config.model.embed_dim=0'], 'model.embed_dim=0 must be > 0', 2),
    ('plan', [*TINY, '--config.train.learning_rate=nan'], 'train.learning_rate=nan must be a finite number >= 0', 2),
    ('evaluate', ['--workdir', '{tmp}/empty'], 'empty has no config.json, so it is not a nopejax workdir', 2),
    ('convert', ['to-hf', '--workdir', '{tmp}/empty', '--hf_dir', '{tmp}/file'], '--hf_dir {tmp}/file is a file', 2),
]


def test_bad_inputs_as_processes(scratch):
  processes = [subprocess.Popen([sys.executable, '-m', MODULES[command], *[_fill(a, scratch) for a in args]], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for command, args, _, _ in IN_PROCESSES]
  for process, (command, args, message, code) in zip(processes, IN_PROCESSES):
    stdout, stderr = process.communicate(timeout=300)
    errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert process.returncode == code and len(errors) == 1 and _fill(message, scratch) in errors[0], stderr[-2000:]
    assert 'Traceback' not in stderr and stdout == '', (command, stdout)


def test_the_catalogue_is_long():
  assert len(CATALOGUE) + len(IN_PROCESSES) >= 60
