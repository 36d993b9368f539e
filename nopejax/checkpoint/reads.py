"""How reading a checkpoint step fails, told apart, because each calls for something else:

  mismatch   the step is whole but holds another tree than the config builds (another schedule,
             optimizer or shape): the config is wrong, so one sentence and nothing is touched;
  transient  storage or network trouble (a timeout, a dropped connection, gs:// answering 503):
             tried again after RETRY_DELAYS, then one sentence, and nothing is touched;
  damage     missing or corrupt files (bad metadata JSON, a chunk tensorstore cannot decode):
             DamagedCheckpoint, which a resume, `load` and evaluation fall back past.
The tree is compared from the stored metadata before any array is read, so an intact step is
never taken for a damaged one.
"""
import errno
import re
import time

import orbax.checkpoint as ocp
from absl import logging

from nopejax.config import ConfigError

# Seconds to wait before each further try of a read that failed for a transient reason.
RETRY_DELAYS = (2.0, 8.0)

# Exception classes (by name, anywhere in the class's bases) that storage clients raise for
# trouble that passes: google.api_core's 5xx, 429 and deadline errors, aiohttp's dropped connections.
_TRANSIENT_NAMES = {'ServerError', 'TooManyRequests', 'DeadlineExceeded', 'RetryError', 'ClientConnectionError',
                    'ClientPayloadError'}
# tensorstore reports a failed read as ValueError('STATUS: ...'); these statuses pass with time.
_TRANSIENT_STATUS = re.compile(r'\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED|CANCELLED):')
# OSErrors that say a file is missing or the wrong kind: damage, not weather.
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


class DamagedCheckpoint(ConfigError):
  """A checkpoint step whose files cannot be read back (a resume falls back past it)."""


class UnreadableCheckpoint(ConfigError):
  """A checkpoint step that storage would not hand over (still failing after retries, or no
  permission): nothing is wrong with it, so nothing falls back past it."""


def is_transient(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, is storage or network trouble that may pass."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    names = {cls.__name__ for cls in type(error).__mro__}
    code = getattr(error, 'code', None)
    if (isinstance(error, (TimeoutError, ConnectionError)) or names & _TRANSIENT_NAMES
        or (isinstance(error, OSError) and not isinstance(error, _MISSING + (PermissionError,))
            and error.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES))
        or ('HttpError' in names and isinstance(code, int) and (code in (408, 429) or code >= 500))
        or (isinstance(error, ValueError) and _TRANSIENT_STATUS.search(str(error)))):
      return True
    error = error.__cause__ or error.__context__
  return False


def _brief(error) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:200] if lines else ""}'.rstrip(': ')


def read(where, fn):
  """fn() (a read of the checkpoint step at `where`), tried again on transient errors.

  Raises UnreadableCheckpoint when it still fails after every try or lacks permission, and
  DamagedCheckpoint for anything else that is not a ConfigError."""
  for delay in RETRY_DELAYS + (None,):
    try:
      return fn()
    except ConfigError:
      raise
    except PermissionError as e:
      raise UnreadableCheckpoint(f'The checkpoint at {where} cannot be read ({_brief(e)}); give this user read '
                                 'access to it, or use another --workdir; nothing was changed.') from None
    except Exception as e:  # Orbax and tensorstore raise many types; is_transient tells them apart.
      if not is_transient(e):
        raise DamagedCheckpoint(
            f'The checkpoint at {where} is damaged ({_brief(e)}); delete that step directory to fall back to '
            'an older one, or use another --workdir.') from None
      if delay is None:
        raise UnreadableCheckpoint(
            f'The checkpoint at {where} could not be read in {len(RETRY_DELAYS) + 1} tries ({_brief(e)}); check the '
            'storage or the connection and run the same command again (nothing was changed).') from None
      logging.warning('Reading the checkpoint at %s failed (%s); trying again in %g s.', where, _brief(e), delay)
      time.sleep(delay)


def _shapes(tree) -> dict:
  """{'a.b.0.c': shape} of a tree's arrays, named as orbax names them on disk."""
  return {'.'.join(str(k) for k in path): tuple(getattr(leaf, 'shape', ()) or ())
          for path, leaf in ocp.tree.to_flat_dict(tree).items()}


def stored_shapes(item_dir) -> dict:
  """{name: shape} of the arrays saved in one item of a step (its metadata only: no array is read)."""
  return _shapes(ocp.StandardCheckpointHandler().metadata(item_dir).tree)


def check_tree(where, item: str, stored: dict, target) -> None:
  """Raises ConfigError naming the first array that differs between the stored item (stored_shapes)
  and `target`, the tree the config builds."""
  ours = _shapes(target)
  what = {'model': 'model', 'opt': 'optimizer state'}.get(item, item)
  problem = None
  if missing := sorted(set(ours) - set(stored)):
    problem = f'its {what} has no {missing[0]}, which this config has ({len(missing)} such arrays)'
  elif extra := sorted(set(stored) - set(ours)):
    problem = f'its {what} has {extra[0]}, which this config has not ({len(extra)} such arrays)'
  elif differ := sorted(k for k in ours if ours[k] != stored[k]):
    problem = f'its {what} array {differ[0]} has shape {stored[differ[0]]} but this config makes {ours[differ[0]]}'
  if problem:
    raise ConfigError(f'The checkpoint at {where} was saved with another config: {problem}; run with the config it '
                      'was saved with (the workdir\'s config.json) or use another --workdir.')
