"""The command line `python -m nopejax.convert from-hf | to-hf`: bad input is one sentence, exit code 2,
and leaves every directory as it was."""
import errno
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


def test_a_file_in_place_of_a_directory_is_refused_before_the_work(tmp_path, capsys):
  (tmp_path / 'file').write_text('mine')
  code = command_line.main(['from-hf', '--hf_dir', str(FIXTURES / 'hf_llama'), '--workdir', str(tmp_path / 'file')])
  assert code == 2 and capsys.readouterr().err == (
      f'error: --workdir {tmp_path / "file"} is a file, not a directory; pass a directory path (new or existing).\n')
  code = command_line.main(['to-hf', '--workdir', str(tmp_path / 'nowhere'), '--hf_dir', str(tmp_path / 'file' / 'hf')])
  assert code == 2 and capsys.readouterr().err.startswith(f'error: --hf_dir {tmp_path / "file" / "hf"} lies under the file')
  assert (tmp_path / 'file').read_text() == 'mine'


def test_a_write_the_disk_refuses_is_one_sentence(tmp_path, capsys, monkeypatch):
  from nopejax.convert import safetensors_files as files
  monkeypatch.setattr(files, 'write_safetensors', lambda *args: (_ for _ in ()).throw(OSError(errno.ENOSPC, 'full')))
  workdir = tmp_path / 'w'
  assert command_line.main(['from-hf', '--hf_dir', str(FIXTURES / 'hf_llama'), '--workdir', str(workdir)]) == 0
  capsys.readouterr()
  code = command_line.main(['to-hf', '--workdir', str(workdir), '--hf_dir', str(tmp_path / 'hf')])
  assert code == 2 and capsys.readouterr().err == (
      f'error: The disk under {tmp_path / "hf"} is full (no space left on device), so {tmp_path / "hf"} is incomplete '
      '(delete it before the next try); free space there and run the same command again.\n')
