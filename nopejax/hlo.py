"""Reading XLA's compiled train step: which arrays make its memory peak, and what one step costs.

memory_analysis() gives totals only, and cost_analysis() counts a while loop's body once (scanned
layers, loss chunks, microbatches). plan.py compiles with `xla_dump_to` (dump_options); this module
reads the dump: the buffer assignment (each array's place in the temporary heap), the live ranges
(when each array is live, on the program's flattened schedule) and the optimized HLO (the op and
source line that made each array). step_cost recounts XLA's cost with every loop body counted once
per iteration. XLA:TPU and XLA:CPU write these files alike; a backend that writes none gets no list.
"""
import collections
import pathlib
import re

Buffer = collections.namedtuple('Buffer', 'bytes shape instruction op source')

# " value: <12787 custom-call.13 @0> (size=738197504,offset=16384): bf16[22,4,2048,2048]{...}" (@ color 0: HBM).
_VALUE = re.compile(r' value: <\d+ (\S+?)(?:\{\})?(?: \(phi\))? @(\d+)> \(size=(\d+),offset=(\d+)\): (.*)$')
_RANGE = re.compile(r'^    (\S+?)(?:\{\})?:(\d+)-(\d+)$')
_DEFINITION = re.compile(r'^\s*(?:ROOT )?%(\S+) = ')


def dump_options(directory) -> dict:
  """jax.jit compiler_options that make XLA write the files peak_buffers reads into `directory`."""
  return {'xla_dump_to': str(directory), 'xla_dump_hlo_as_text': True}


def _read(directory, suffix):
  found = sorted(pathlib.Path(directory).glob(f'*{suffix}'))
  return found[-1].read_text() if found else None


def _temp_values(assignment):
  """(name, offset, size, shape) of the arrays in the temporary heap of the default memory space."""
  values, in_temp = [], False
  for line in assignment.splitlines():
    if line.startswith('allocation '):
      in_temp = 'preallocated-temp' in line and ' color ' not in line
    elif in_temp:
      match = _VALUE.match(line)
      if match and match[2] == '0' and not match[5].startswith('('):  # A tuple's own value is a table of pointers.
        values.append((match[1], int(match[4]), int(match[3]), match[5]))
  return values


def _live_ranges(live_range):
  ranges = {}
  for line in live_range.split('BufferLiveRange:', 1)[-1].splitlines():
    match = _RANGE.match(line)
    if match:
      ranges[match[1]] = (int(match[2]), int(match[3]))
  return ranges


def _live_at(values, ranges, time):
  """Arrays live at `time`, one per heap slot: aliases of one array (a loop's carry) share a slot;
  the earliest-defined one names it."""
  slots = {}
  for value in sorted(values, key=lambda v: ranges[v[0]][0]):
    start, end = ranges[value[0]]
    if start <= time <= end:
      slots.setdefault((value[1], value[2]), value)
  return list(slots.values())


def _peak_time(values, ranges):
  """The time the heap reaches its top address, at its fullest moment within the top array's life."""
  top = max(values, key=lambda v: v[1] + v[2])
  first, last = ranges[top[0]]
  times = sorted({ranges[v[0]][0] for v in values if first <= ranges[v[0]][0] <= last} | {first})
  return max(times, key=lambda t: sum(v[2] for v in _live_at(values, ranges, t)))


def _stack_frames(hlo_text):
  """stack_frame_id -> [(file, line, function), ...] innermost first, from the HLO's frame tables."""
  def table(name):
    block = re.search(rf'^{name}\n((?:\d+ .*\n)*)', hlo_text, re.M)
    return {int(row.split(' ', 1)[0]): row.split(' ', 1)[1] for row in block[1].splitlines()} if block else {}
  files, functions = table('FileNames'), table('FunctionNames')
  locations = {k: dict(re.findall(r'(\w+)=(\d+)', v)) for k, v in table('FileLocations').items()}
  parents = {k: dict(re.findall(r'(\w+)=(\d+)', v)) for k, v in table('StackFrames').items()}

  def frames(frame_id):
    chain = []
    while frame_id in parents and len(chain) < 64:
      where = locations[int(parents[frame_id]['file_location_id'])]
      chain.append((files[int(where['file_name_id'])].strip('"'), int(where['line']),
                    functions[int(where['function_name_id'])].strip('"')))
      frame_id = int(parents[frame_id]['parent_frame_id']) - 1  # Printed one above the id; 0: the root.
    return chain
  return frames


def _describe(hlo_text, names):
  """name -> (op_name, our source lines) of the instructions `names` in the optimized HLO."""
  frames, found = _stack_frames(hlo_text), {}
  for line in hlo_text.splitlines():
    match = _DEFINITION.match(line)
    if not match or match[1] not in names:
      continue
    op = re.search(r'op_name="((?:[^"\\]|\\.)*)"', line)
    frame = re.search(r'stack_frame_id=(\d+)', line)
    ours = [f'{pathlib.Path(f).name}:{n} {fn}' for f, n, fn in (frames(int(frame[1])) if frame else [])
            if '/nopejax/' in f][:2]
    found[match[1]] = (op[1].replace('\\', '').removeprefix('jit(train_step)/') if op else match[1], ' < '.join(ours))
  return found


def peak_buffers(directory, top=10):
  """{'heap_bytes', 'live_bytes', 'buffers': the `top` largest Buffers} of the temporary heap at its
  peak, from a dump written under dump_options; None where XLA wrote no buffer assignment."""
  assignment = _read(directory, 'after_optimizations-buffer-assignment.txt')
  live_range = _read(directory, 'after_optimizations-live-range.txt')
  hlo_text = _read(directory, 'after_optimizations.txt')
  if not (assignment and live_range and hlo_text):
    return None
  ranges = _live_ranges(live_range)
  values = [v for v in _temp_values(assignment) if v[0] in ranges]
  if not values:
    return None
  live = sorted(_live_at(values, ranges, _peak_time(values, ranges)), key=lambda v: -v[2])
  described = _describe(hlo_text, {v[0].split('{')[0] for v in live[:top]})
  buffers = []
  for name, _, size, shape in live[:top]:
    op, source = described.get(name.split('{')[0], (name, ''))
    buffers.append(Buffer(size, re.sub(r'\{[^}]*\}', '', shape), name, op, source))
  return {'heap_bytes': max(v[1] + v[2] for v in values), 'live_bytes': sum(v[2] for v in live), 'buffers': buffers}


def _computations(hlo_text):
  """(text before the first computation, {name: (header, lines)} of every computation, entry name)."""
  blocks, entry, name = {}, None, None
  lines = hlo_text.splitlines()
  first = next(i for i, line in enumerate(lines) if re.match(r'^(ENTRY )?%\S+ .*\{$', line))
  for line in lines[first:]:
    header = re.match(r'^(ENTRY )?%(\S+) (.*\{)$', line)
    if header:
      name, entry = header[2], header[2] if header[1] else entry
      blocks[name] = (header[3], [])
    elif line == '}':
      name = None
    elif name:
      blocks[name][1].append(line)
  return '\n'.join(lines[1:first]), blocks, entry


def _trip_count(while_line, blocks):
  """A while loop's iterations: XLA's known_trip_count, or the bound its condition compares the
  counter with (scans count from 0 by 1); 1 where neither says."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', while_line)
  if known:
    return int(known[1])
  condition = blocks.get(re.search(r'condition=%([^,\s]+)', while_line)[1], ('', []))[1]
  bounds = [int(m[1]) for m in (re.search(r' constant\((\d+)\)', line) for line in condition) if m]
  compares_less = any('direction=LT' in line for line in condition)
  return bounds[0] if len(bounds) == 1 and compares_less else 1


def step_cost(hlo_text, xla_cost, client):
  """{'flops', 'bytes accessed'} of one step: xla_cost (compiled.cost_analysis()) with every while
  loop's body counted once per iteration; None where this jaxlib cannot reparse HLO.

  XLA counts a loop body once. Here each body is costed alone by XLA's own analysis (a copy of the
  module entered at that body, on `client`, any local backend's) and added (iterations - 1) times,
  times the iterations of the loops around it; xla_cost is scaled by the ratio of the two counts.
  """
  try:
    from jax._src.lib import _jax
    from jaxlib import _hlo
  except ImportError:
    return None
  prologue, blocks, entry = _computations(hlo_text)

  def cost(entry_name):  # The same module, entered at entry_name.
    text = '\n\n'.join(f'{"ENTRY " if name == entry_name else ""}%{name} {header}\n' + '\n'.join(lines) + '\n}'
                        for name, (header, lines) in blocks.items())
    module = _hlo.hlo_module_from_text(f'HloModule step_cost\n{prologue}\n{text}')
    analysis = _jax.hlo_module_cost_analysis(client, module)
    return {key: float(analysis.get(key, 0.0)) for key in ('flops', 'bytes accessed')}

  try:
    once = cost(entry)
  except Exception:  # XLA cannot parse this backend's text back: no recount, rather than no plan.
    return None
  total = dict(once)
  pending, seen = [(entry, 1)], set()
  while pending:  # Down the calls from the entry, each computation with the iterations around it.
    name, repeats = pending.pop()
    if name in seen or name not in blocks:
      continue
    seen.add(name)
    for line in blocks[name][1]:
      loop = re.search(r' while\(.*body=%([^,\s]+)', line)
      if loop:
        trips = _trip_count(line, blocks)
        body = cost(loop[1])
        for key in total:
          total[key] += repeats * (trips - 1) * body[key]
        pending.append((loop[1], repeats * trips))
      calls = re.findall(r'(?:calls|to_apply)=%([^,\s}]+)', line)
      branches = re.search(r'branch_computations=\{([^}]*)\}', line)
      calls += re.findall(r'%([^,\s]+)', branches[1]) if branches else []
      pending += [(called, repeats) for called in calls]
  return {key: float(xla_cost.get(key, 0.0)) * total[key] / max(once[key], 1.0) for key in total}


def refusal_buffers(message, top=10):
  """The largest allocations XLA:TPU lists when it refuses a program that does not fit (its
  'Largest program allocations in hbm'), as Buffers; [] for a refusal without the list."""
  unit = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
  listing = message.split('Largest program allocations in hbm:', 1)
  buffers = []
  for entry in (listing[1].split('Largest program arguments', 1)[0].split('=====') if len(listing) > 1 else []):
    size = re.search(r'Size: ([\d.]+)([KMGT])', entry)
    if not size:
      continue
    op = re.search(r'op_name="((?:[^"\\]|\\.)*)"', entry)
    shape = re.search(r'Shape: (\S+)', entry)
    label = re.search(r'XLA label: (.+?)(?: = |\n|$)', entry)
    kind = re.search(r'Allocation type: (.+)', entry)
    buffers.append(Buffer(int(float(size[1]) * unit[size[2]]), re.sub(r'\{[^}]*\}', '', shape[1]) if shape else '',
                          label[1] if label else '',
                          op[1].removeprefix('jit(train_step)/') if op else (label[1] if label else ''),
                          kind[1].strip() if kind else ''))
  return buffers[:top]
