"""nopejax.data.prepared: the fingerprint of a corpus's files (the lock and the shard check run in test_sources)."""
import os

from etils import epath

from nopejax.data import prepared


def test_fingerprint_reads_only_files_whose_size_or_mtime_moved(tmp_path, monkeypatch):
  for name in ('a.txt', 'b.txt'):
    (tmp_path / name).write_text(name)
  files = sorted(epath.Path(tmp_path).iterdir())
  then = prepared.fingerprint(epath.Path(tmp_path), files)
  read = []
  content_hash = prepared._content_hash
  monkeypatch.setattr(prepared, '_content_hash', lambda path: read.append(path.name) or content_hash(path))
  assert prepared.fingerprint(epath.Path(tmp_path), files, then) == then and read == []
  stat = os.stat(tmp_path / 'a.txt')
  os.utime(tmp_path / 'a.txt', ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # Touched, not edited.
  now = prepared.fingerprint(epath.Path(tmp_path), files, then)
  assert read == ['a.txt'] and prepared.changed_files(then, now) == []
  (tmp_path / 'b.txt').write_text('B.TXT')  # The same size, other bytes.
  os.utime(tmp_path / 'b.txt', ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
  assert prepared.changed_files(then, prepared.fingerprint(epath.Path(tmp_path), files, then)) == ['b.txt']
  # An older record of sizes alone compares sizes.
  assert prepared.changed_files({'a.txt': [5], 'b.txt': [5]}, now) == []
