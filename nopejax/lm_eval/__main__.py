"""`python -m nopejax.lm_eval [lm_eval's arguments]`: lm_eval's command line with the model `nopejax`
registered (see the package docstring). Bad model arguments end in one sentence and exit code 2."""
import sys

from nopejax import config, host


def main():
  host.keep_cpu_buffers()  # Before jax starts, as the other command lines.
  try:
    import nopejax.lm_eval  # noqa: F401  Registers the model 'nopejax'.
    from lm_eval.__main__ import cli_evaluate
  except ModuleNotFoundError as e:
    if (e.name or '').split('.')[0] != 'lm_eval':
      raise
    config.exit_with_sentence(nopejax.lm_eval.MISSING)
  sys.argv[0] = 'python -m nopejax.lm_eval'
  try:
    cli_evaluate()
  except config.ConfigError as e:
    config.exit_with_sentence(str(e))


if __name__ == '__main__':
  main()
