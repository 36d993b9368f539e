"""Directories the commands write into: checked before the work that fills them, and a write that
the disk refuses (full, over quota, read-only, no permission) told in one sentence with its fix
instead of a traceback from every thread that was writing."""
import contextlib
import errno
import logging as logging_std
import os
import re
import sys

from nopejax import paths
from nopejax.config import ConfigError

# What each refusal means and what the user does about it ({path}, {flag} filled in).
_REFUSALS = {
    errno.ENOSPC: ('the disk under {path} is full (no space left on device)',
                   'free space there and run the same command again'),
    errno.EDQUOT: ('the disk quota under {path} is used up', 'free space or raise the quota and run the same command again'),
    errno.EROFS: ('{path} is on a read-only file system', 'remount it writable or pass another {flag}'),
    errno.EACCES: ('this user may not write to {path} (permission denied)', 'change its permissions or pass another {flag}'),
    errno.EPERM: ('this user may not write to {path} (operation not permitted)',
                  'change its permissions or pass another {flag}'),
}
# tensorstore, which writes orbax's arrays, reports the OS error in a ValueError: "... [os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def refused(error: BaseException) -> int | None:
  """The errno of a write the disk refused, in `error` or an error it was raised from; else None."""
  seen = set()
  while error is not None and id(error) not in seen and not isinstance(error, ConfigError):
    seen.add(id(error))
    code = error.errno if isinstance(error, OSError) else None
    if code is None and (match := _OS_ERROR_CODE.search(str(error))):
      code = int(match.group(1))
    if code in _REFUSALS:
      return code
    error = error.__cause__ or error.__context__
  return None


def sentence(path, code: int, flag='--workdir', then='') -> str:
  """One sentence for a refused write of errno `code` under `path`; `then` follows the problem."""
  problem, fix = _REFUSALS[code]
  text = f'{problem.format(path=path)}{then}; {fix.format(flag=flag)}.'
  return text[0].upper() + text[1:]


def check_writable(path, flag='--workdir') -> None:
  """Raises ConfigError when `path`, a directory to create or fill, cannot be written: a file in the
  way, a read-only file system, no permission. A URL (gs://) is left to its first write."""
  if paths.is_url(path):
    return
  path = os.path.abspath(os.fspath(path))
  existing = path
  while not os.path.isdir(existing):
    if os.path.lexists(existing):
      where = 'is a file' if existing == path else f'lies under the file {existing}'
      raise ConfigError(f'{flag} {path} {where}, not a directory; pass a directory path (new or existing).')
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK | os.X_OK):
    code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
    raise ConfigError(sentence(path, code, flag))


class EchoesOfRefusedWrites(logging_std.Filter):
  """Drops orbax's own error logs of a refused write (each writing thread logs one, with its
  traceback): the error reaches the command line, which tells it in one sentence."""

  def filter(self, record):
    if record.levelno < logging_std.ERROR or 'orbax' not in record.pathname:
      return True
    return not (refused(Exception(record.getMessage())) or (record.exc_info and refused(record.exc_info[1])))


@contextlib.contextmanager
def echoes_of_refused_writes_dropped():
  """Within: orbax's logs of a refused write are dropped (EchoesOfRefusedWrites), and so are the
  'Event loop is closed' tracebacks of tensorstore's late callbacks into the closed event loops of
  the failed writes (Python prints each as unraisable); any other goes on to the hook replaced."""
  echoes, previous = EchoesOfRefusedWrites(), sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)

  logging_std.getLogger('absl').addFilter(echoes)  # orbax logs through absl.
  sys.unraisablehook = hook
  try:
    yield
  finally:
    logging_std.getLogger('absl').removeFilter(echoes)
    if sys.unraisablehook is hook:
      sys.unraisablehook = previous
