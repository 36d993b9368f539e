"""The command line: `python -m nopejax.convert from-hf ...` or `to-hf ...` (see the package
docstring). The subcommand is the first argument; each one's flags live in a FlagValues of their
own, so importing this module defines no global flag and both subcommands can take --workdir and
--hf_dir. Bad input ends in one sentence and exit code 2."""
import sys

from absl import flags

from nopejax.config import ConfigError
from nopejax.convert import hf

PROGRAM = 'python -m nopejax.convert'


def _from_hf_flags() -> flags.FlagValues:
  values = flags.FlagValues()
  flags.DEFINE_string('hf_dir', None, 'The Hugging Face Llama or SmolLM3 directory (config.json and safetensors).',
                      flag_values=values)
  flags.DEFINE_string('workdir', None, 'The new nopejax workdir, local or gs://.', flag_values=values)
  flags.DEFINE_bool('nope', False, 'The checkpoint is NoPE: drop the rotary embedding (its config.json cannot say so).',
                    flag_values=values)
  flags.DEFINE_string('tokenizer', None, "SentencePiece .model or 'byte'; default: the checkpoint's tokenizer.model.",
                      flag_values=values)
  flags.DEFINE_string('compute_dtype', 'float32', 'model.dtype of the run: float32 or bfloat16.', flag_values=values)
  return values


def _to_hf_flags() -> flags.FlagValues:
  values = flags.FlagValues()
  flags.DEFINE_string('workdir', None, 'The nopejax workdir (pretrain or search) whose latest model to write.',
                      flag_values=values)
  flags.DEFINE_string('hf_dir', None, 'The new Hugging Face directory.', flag_values=values)
  flags.DEFINE_string('dtype', 'auto', "Stored dtype: float32, bfloat16, float16, or auto (the source checkpoint's, "
                      'else float32).', flag_values=values)
  flags.DEFINE_bool('fold_temperatures', False,
                    'Multiply q_proj by the temperatures instead of writing scale_param: a plain Llama.', flag_values=values)
  flags.DEFINE_float('max_shard_mb', 4096, 'Largest safetensors file, MiB.', flag_values=values)
  flags.DEFINE_string('layout', 'auto', "smollm3 (per-layer no_rope_layers, temperatures folded: loads unpatched), "
                      "llama (the paper's NoPE Llama, scale_param) or auto (smollm3 unless every layer uses RoPE).",
                      flag_values=values)
  return values


COMMANDS = {'from-hf': (_from_hf_flags, 'a Hugging Face Llama or SmolLM3 directory -> a new nopejax workdir'),
            'to-hf': (_to_hf_flags, 'a nopejax workdir (pretrain or search) -> a Hugging Face SmolLM3 or Llama directory')}


def _parse(command, args) -> flags.FlagValues:
  values = COMMANDS[command][0]()
  try:
    rest = values([f'{PROGRAM} {command}', *args])
  except flags.Error as e:
    raise ConfigError(f'{" ".join(str(e).split()).rstrip(".")}; see {PROGRAM} {command} --help.') from None
  if len(rest) > 1:
    raise ConfigError(f'Unexpected arguments {rest[1:]}; every setting of {command} is a --flag=value.')
  for name in ('hf_dir', 'workdir'):
    if values[name].value is None:
      raise ConfigError(f'No --{name} given; {command} needs both --hf_dir and --workdir.')
  return values


def _position(summary) -> str:
  """'nope', 'rope', or a hybrid's 'rope on layers 1,1,1,0' (model.rope_layers)."""
  layers = summary.get('rope_layers')
  return f'{summary["position"]} on layers {layers}' if layers else summary['position']


def _run(command, values) -> None:
  if command == 'from-hf':
    summary = hf.from_hf(values.hf_dir, values.workdir, values.nope, values.tokenizer, values.compute_dtype)
    print(f'Wrote {summary["workdir"]}: {summary["tensors"]} tensors, position {_position(summary)}, '
          f'{"head-scale temperatures" if summary["head_scale"] else "temperatures 1"}, tokenizer '
          f'{summary["tokenizer"] or "none (set --config.data.tokenizer when training or evaluating)"}.')
    return
  if values.max_shard_mb <= 0:
    raise ConfigError(f'--max_shard_mb {values.max_shard_mb} must be positive; pass e.g. 4096.')
  summary = hf.to_hf_dir(values.workdir, values.hf_dir, values.dtype, values.fold_temperatures, values.max_shard_mb,
                         values.layout)
  how = 'scale_param' if summary['scale_param'] else 'folded into q_proj' if summary['folded'] else 'none (all 1)'
  print(f'Wrote {summary["hf_dir"]}: {summary["layout"]} layout, {summary["tensors"]} tensors in {summary["files"]} '
        f'file(s), position {_position(summary)}, temperatures: {how}.')


def main(argv=None) -> int:
  """Runs `COMMAND --flag=value ...` (argv without the program name; default sys.argv[1:]); the exit code."""
  import nopejax.convert
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] in ('-h', '--help'):
    print(nopejax.convert.__doc__)
    return 0
  try:
    if not argv or argv[0] not in COMMANDS:
      raise ConfigError(f'{"No command given" if not argv else repr(argv[0]) + " is not a command"}; pass from-hf or '
                        f'to-hf first, e.g. {PROGRAM} from-hf --hf_dir DIR --workdir OUT.')
    command, args = argv[0], argv[1:]
    if '-h' in args or '--help' in args:
      values = COMMANDS[command][0]()
      print(f'{PROGRAM} {command}: {COMMANDS[command][1]}')
      for name in values:
        print(f'  --{name}: {values[name].help} (default: {values[name].default})')
      return 0
    values = _parse(command, args)
    try:
      _run(command, values)
    except Exception as e:  # A write the disk refused (full, read-only): one sentence, not a traceback.
      from nopejax.checkpoint import disk
      code = None if isinstance(e, ConfigError) else disk.refused(e)
      if code is None:
        raise
      out, flag = (values.workdir, '--workdir') if command == 'from-hf' else (values.hf_dir, '--hf_dir')
      raise ConfigError(disk.sentence(out, code, flag, then=f', so {out} is incomplete (delete it before the '
                                      'next try)')) from None
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
