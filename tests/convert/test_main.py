"""The command line `python -m nopejax.convert from-hf | to-hf`: bad input is one sentence, exit code 2,
and leaves every directory as it was."""
import os

from hf_fixtures import FIXTURES
from nopejax.convert import __main__ as command_line


def test_bad_directories_are_refused_and_left_untouched(tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  assert command_line.main(['from-hf', '--hf_dir', str(tmp_path / 'empty'), '--workdir', str(tmp_path / 'w')]) == 2
  assert capsys.readouterr().err.startswith(f'error: --hf_dir {tmp_path / "empty"} has no config.json;')
  assert not (tmp_path / 'w').exists()

  occupied = tmp_path / 'occupied'
  occupied.mkdir()
  (occupied / 'notes.txt').write_text('mine')
  code = command_line.main(['from-hf', '--hf_dir', str(FIXTURES / 'hf_llama'), '--workdir', str(occupied)])
  assert code == 2 and 'is not empty; convert into a new directory' in capsys.readouterr().err
  assert os.listdir(occupied) == ['notes.txt']
  code = command_line.main(['to-hf', '--workdir', str(tmp_path / 'nowhere'), '--hf_dir', str(occupied)])
  assert code == 2 and 'exists and is not empty; write into a new directory' in capsys.readouterr().err
  assert os.listdir(occupied) == ['notes.txt']


def test_bad_commands_and_flags_are_one_sentence(tmp_path, capsys):
  for argv, message in [
      ([], 'error: No command given; pass from-hf or to-hf first'),
      (['from-pt'], "error: 'from-pt' is not a command; pass from-hf or to-hf first"),
      (['from-hf', '--workdir', str(tmp_path / 'w')], 'error: No --hf_dir given; from-hf needs both --hf_dir and --workdir.'),
      (['to-hf', '--workdir', 'w', '--hf_dir', 'h', '--max_shard_mb', '0'], 'error: --max_shard_mb 0.0 must be positive'),
      (['to-hf', '--workdir', 'w', '--hf_dir', 'h', '--shard_mb', '1'], "error: Unknown command line flag 'shard_mb'"),
      (['from-hf', '--hf_dir', 'h', '--workdir', 'w', 'extra'], "error: Unexpected arguments ['extra']")]:
    assert command_line.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count('\n') == 1, err
  assert command_line.main(['to-hf', '--help']) == 0
  assert '--max_shard_mb: Largest safetensors file, MiB. (default: 4096' in capsys.readouterr().out
