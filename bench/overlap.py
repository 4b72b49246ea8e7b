"""Which of ma_sep's collectives overlap compute: read from the compiled, scheduled HLO.

Compiles the ma_sep train step of the paper config as bench/memory.py's paper row does (12:4,
M = 4, bf16, 16 accumulation chunks, full remat; cuDNN attention on the GPU compile, the XLA
attention on CPU) and reads `compiled.as_text()`, the scheduled module: in every control-flow
computation (ENTRY, while bodies, the branches of every conditional) the instructions are listed
in the order they run. For every asynchronous collective (a `*-start` / `*-done` pair, or
`send`/`recv` with their dones) it records the kind, the size of its device groups, its bytes
(the result on one device, as mas_jax/perf/hlo.py counts them), where it sits (outside the
conditionals, or inside branch i of a conditional: in ma_sep's ticks branch 0 is attention, 1 the
experts, 2 idle) and what the schedule puts between its start and its done: the instructions,
how many of them are compute (fusions, custom-calls such as cuBLAS GEMMs and cuDNN attention,
dots, convolutions, nested conditionals and loops) and which of those hold a matmul. A pair with
compute between start and done is "overlapped" ("heavy" where a matmul or a nested conditional
or loop lies between); a synchronous collective (no start/done; the GPU compiler prints a pair it
scheduled with nothing between as one op marked is_sync) and a pair marked `is_sync` overlap
nothing.

The compile runs once per variant of XLA_FLAGS (the latency-hiding scheduler, pipelined
collectives, ...), each in its own process (XLA reads its flags once per process; an unknown
flag aborts it, and the variant is then recorded as failed). The flags are GPU-compiler flags:
on CPU only the default variant runs.

  python bench/overlap.py --gpu_topology=1x1x16    # on a machine with one GPU: every variant
  python bench/overlap.py                          # the CPU compile (minutes), default only
  python bench/overlap.py --smoke                  # the tiny config on 16 fake CPU devices
  python bench/overlap.py --gpu_topology=1x1x16 --variants=none --roles    # the roles only

`--roles` also times each role's work of one tick on this process's first device (the local GPU,
or a CPU device): the attention devices' part (their head slots) and the expert devices' part
(their local experts; its all_to_all and all_gather replaced by reshapes of the same bytes), each
forward and backward (the forward recomputed, then its VJP, as ma_sep's backward tick runs), at
the step's micro-batch shape; then each role's busy and idle time per step over the tick
schedule (`ma_separation.schedule`), compute only.

Writes docs/benchmarks/overlap[_cpu|_smoke].json (the command line, the target, and per variant
its flags, summary and every collective; with --roles the role timings) and prints markdown
tables. A run into an existing file of the same compile keeps the variants it does not redo, so
a long GPU run can be split over calls (`--variants=default,lhs,no_lhs`, then the others).
`--hlo_dir DIR` keeps each variant's HLO text (gzip).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib

if '--gpu_topology' not in ' '.join(sys.argv):
  os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=16')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mas_jax.perf import hlo  # noqa: E402

# The GPU compiler's flags around its latency-hiding scheduler (LHS). Each exists in the XLA of
# JAX 0.10.2 (checked: a process with the flag in XLA_FLAGS starts, one with an unknown flag
# aborts). Defaults, from xla/debug_options_flags.cc: LHS off in DebugOptions (the GPU compiler
# may still schedule with it), highest-priority async stream on, pipelined reduce-scatter on,
# pipelined all-reduce / all-gather / p2p and while-loop double buffering off.
LHS = '--xla_gpu_enable_latency_hiding_scheduler=true'
VARIANTS = {
  'default': '',
  'lhs': LHS,
  'no_lhs': '--xla_gpu_enable_latency_hiding_scheduler=false',
  'lhs_pipelined_all_reduce': f'{LHS} --xla_gpu_enable_pipelined_all_reduce=true',
  'lhs_pipelined_all_gather': f'{LHS} --xla_gpu_enable_pipelined_all_gather=true',
  'lhs_pipelined_reduce_scatter': f'{LHS} --xla_gpu_enable_pipelined_reduce_scatter=true',
  'lhs_pipelined_p2p': f'{LHS} --xla_gpu_enable_pipelined_p2p=true',
  'lhs_double_buffering': f'{LHS} --xla_gpu_enable_while_loop_double_buffering=true',
  'lhs_highest_priority_stream': f'{LHS} --xla_gpu_enable_highest_priority_async_stream=true',
  'lhs_all_pipelined': f'{LHS} --xla_gpu_enable_pipelined_all_reduce=true '
  '--xla_gpu_enable_pipelined_all_gather=true --xla_gpu_enable_pipelined_reduce_scatter=true '
  '--xla_gpu_enable_pipelined_p2p=true',
  # Every collective synchronous: the baseline with nothing overlapped.
  'sync_collectives': '--xla_gpu_disable_async_collectives=allreduce,allgather,reducescatter,'
  'collectivebroadcast,alltoall,collectivepermute',
}

# The branches of ma_sep's per-tick `lax.switch` (forward and backward), in
# mas_jax/strategies/ma_separation.py's fixed order: attention, experts, idle.
TICK_ROLES = ('attention', 'experts', 'idle')
# Collective opcodes: synchronous as they are, asynchronous with -start/-update/-done.
KINDS = (*hlo.KINDS, 'ragged-all-to-all', 'collective-broadcast')
# Instructions that launch no work on the device.
_BOOKKEEPING = {
  'parameter',
  'constant',
  'get-tuple-element',
  'tuple',
  'bitcast',
  'partition-id',
  'replica-id',
  'after-all',
  'add-dependency',
  'opt-barrier',
  'domain',
  'get-dimension-size',
}
_CONTROL = {'conditional', 'while', 'call'}
_MATMUL_TARGET = re.compile(r'gemm|matmul|cublas|cudnn|fmha|conv', re.IGNORECASE)
# Synthetic paper config of the smoke run's size: the tiny model, M = 4, two accumulation chunks
# (so the ticks sit in a loop, as in the paper row), all_to_all dispatch (4 sequences per
# micro-batch over the 4 expert devices).
SMOKE = {
  'parallel.strategy': 'ma_sep',
  'parallel.num_microbatches': 4,
  'model.remat': 'full',
  'train.grad_accum_steps': 2,
  'data.batch_size': 32,
}
MAX_NAMES = 40  # compute instructions named per pair in the JSON (all are counted)


# ---------------------------------------------------------------------------------------------
# The scheduled HLO text.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  result: str  # the result type, e.g. 'f32[4,64]{1,0}' or a tuple
  operands: tuple[str, ...]  # operand instruction names
  attrs: str  # everything after the operand list
  root: bool = False


_INSTRUCTION = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$')


def _split_operands(text: str) -> tuple[tuple[str, ...], str]:
  """'a, (f32[2]) %b), k=v' (after 'opcode(') -> (('a', 'b'), ', k=v')."""
  depth, parts, current = 0, [], ''
  for i, ch in enumerate(text):
    if ch in '([{':
      depth += 1
    elif ch in ')]}':
      if depth == 0:  # the operand list's closing parenthesis
        parts.append(current)
        names = tuple(p.split()[-1].lstrip('%') for p in parts if p.strip())
        return names, text[i + 1 :]
      depth -= 1
    if ch == ',' and depth == 0:
      parts.append(current)
      current = ''
    else:
      current += ch
  raise ValueError(f'unbalanced operand list: {text[:200]}')


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """{computation: its instructions in printed (for a scheduled module: schedule) order}, and
  the ENTRY computation's name."""
  comps: dict[str, list[Instruction]] = {}
  entry, current = None, None
  for line in text.split('\n'):
    m = hlo._COMPUTATION.match(line)
    if m:
      current = m.group(2)
      comps[current] = []
      entry = current if m.group(1) else entry
      continue
    m = _INSTRUCTION.match(line) if current is not None else None
    if m:
      operands, attrs = _split_operands(m.group(5))
      comps[current].append(
        Instruction(m.group(2), m.group(4), m.group(3), operands, attrs, bool(m.group(1)))
      )
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return comps, entry


def _called(ins: Instruction, key: str) -> list[str]:
  m = re.search(key + r'=\{([^}]*)\}', ins.attrs)
  if m:
    return [n.strip().lstrip('%') for n in m.group(1).split(',')]
  return re.findall(key + r'=%?([\w.\-]+)', ins.attrs)


@dataclasses.dataclass(frozen=True)
class Scope:
  """Where a control-flow computation runs: its path from ENTRY and executions per step."""

  path: str  # e.g. 'ENTRY > while.3 body > conditional.108 branch 1'
  branch: int | None  # the branch index of the outermost conditional around it, if any
  branches: int | None  # that conditional's branch count
  executions: int | None  # per execution of ENTRY; None under a loop of unknown trip count


def scopes(comps: dict[str, list[Instruction]], entry: str) -> dict[str, Scope]:
  """Every computation reached from ENTRY through while, conditional and call (fusions,
  reductions and async wrappers hold no schedule of their own), with its Scope (first path
  found; executions summed over every path)."""
  out: dict[str, Scope] = {}

  def visit(name, path, branch, branches, times):
    if name in out:
      old = out[name]
      total = None if None in (old.executions, times) else old.executions + times
      out[name] = dataclasses.replace(old, executions=total)
    else:
      out[name] = Scope(path, branch, branches, times)
    for ins in comps.get(name, []):
      if ins.opcode == 'while':
        trip = re.search(r'known_trip_count[^0-9]*(\d+)', ins.attrs)
        n = None if trip is None or times is None else times * int(trip.group(1))
        for body in _called(ins, 'body'):
          visit(body, f'{path} > {ins.name} body', branch, branches, n)
        for cond in _called(ins, 'condition'):
          visit(cond, f'{path} > {ins.name} condition', branch, branches, n)
      elif ins.opcode == 'conditional':
        names = _called(ins, 'branch_computations') or (
          _called(ins, 'true_computation') + _called(ins, 'false_computation')
        )
        for i, b in enumerate(names):
          outer = (branch, branches) if branch is not None else (i, len(names))
          visit(b, f'{path} > {ins.name} branch {i}', *outer, times)
      elif ins.opcode == 'call':  # not async-start: its computation wraps the one op it runs
        for c in _called(ins, 'to_apply'):
          visit(c, f'{path} > {ins.name}', branch, branches, times)

  visit(entry, 'ENTRY', None, None, 1)
  return {k: v for k, v in out.items() if k in comps}


def _kind(ins: Instruction, comps, by_name=None) -> tuple[str, str] | None:
  """(collective kind, phase: 'sync' | 'start' | 'update' | 'done'), or None for other ops.

  `by_name` (the computation's instructions) lets an unsugared async-update/-done that names no
  computation take the kind of the async-start it reads."""
  op = ins.opcode
  if op in KINDS:
    return op, 'sync'
  if op in ('send', 'recv'):
    return op, 'start'
  if op in ('send-done', 'recv-done'):
    return op.removesuffix('-done'), 'done'
  for phase in ('start', 'update', 'done'):
    if op.endswith(f'-{phase}') and op.removesuffix(f'-{phase}') in KINDS:
      return op.removesuffix(f'-{phase}'), phase
  if op.startswith('async-'):  # the unsugared form: the collective is in the called computation
    for c in _called(ins, 'calls'):
      for inner in comps.get(c, []):
        if inner.opcode in KINDS:
          return inner.opcode, op.removeprefix('async-')
    if by_name and op != 'async-start' and ins.operands and ins.operands[0] in by_name:
      inner = _kind(by_name[ins.operands[0]], comps, by_name)
      return None if inner is None else (inner[0], op.removeprefix('async-'))
  return None


def _holds_matmul(ins: Instruction, comps) -> bool:
  """A dot, convolution or GEMM/cuDNN custom-call, or a fusion whose computation holds one."""
  if ins.opcode in ('dot', 'convolution'):
    return True
  if ins.opcode.startswith('custom-call'):
    target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
    return bool(target and _MATMUL_TARGET.search(target.group(1)))
  if ins.opcode in ('fusion', 'fusion-start'):
    return any(_holds_matmul(i, comps) for c in _called(ins, 'calls') for i in comps.get(c, []))
  return False


def _is_compute(ins: Instruction, comps) -> bool:
  """Work on the device's compute stream: anything but bookkeeping, collectives, and the
  done/update halves of asynchronous ops (a `fusion-start` is compute, a `copy-start` not)."""
  op = ins.opcode
  if op in _BOOKKEEPING or _kind(ins, comps) is not None:
    return False
  return not (op.endswith('-done') or op.endswith('-update') or op == 'copy-start')


def _start_of(done: Instruction, comps, by_name: dict[str, Instruction]) -> Instruction | None:
  """The start a done reads (through async-update links), if it is in the same computation."""
  seen = done
  while seen.operands and seen.operands[0] in by_name:
    seen = by_name[seen.operands[0]]
    kind = _kind(seen, comps, by_name)
    if kind is None or kind[1] != 'update':
      return seen if kind is not None and kind[1] == 'start' else None
  return None


def _loop_carried_start(done: Instruction, instrs: list[Instruction]) -> Instruction | None:
  """A pipelined collective's start in the previous iteration: the done reads tuple element k of
  the loop parameter, and the body's ROOT tuple puts a start there."""
  by_name = {i.name: i for i in instrs}
  gte = by_name.get(done.operands[0]) if done.operands else None
  if gte is None or gte.opcode != 'get-tuple-element':
    return None
  param = by_name.get(gte.operands[0])
  index = re.search(r'index=(\d+)', gte.attrs)
  root = next((i for i in instrs if i.root), None)
  if param is None or param.opcode != 'parameter' or index is None or root is None:
    return None
  if root.opcode != 'tuple' or int(index.group(1)) >= len(root.operands):
    return None
  return by_name.get(root.operands[int(index.group(1))])


def _group(ins: Instruction) -> int:
  m = re.search(r'_xla_send_recv_source_target_pairs="?\{(.*?\})\}', ins.attrs)
  if m:  # send/recv: the "group" is the number of (source, target) pairs, as for a permute
    return len(re.findall(r'\{\d+,\d+\}', m.group(1)))
  return hlo._group_size(ins.attrs)


def _op_name(ins: Instruction) -> str:
  m = re.search(r'op_name="([^"]*)"', ins.attrs)
  return m.group(1) if m else ''


def _location(scope: Scope) -> str:
  """'outside conditionals', or 'branch i' (with the tick role for a 3-branch conditional)."""
  if scope.branch is None:
    return 'outside conditionals'
  role = f' ({TICK_ROLES[scope.branch]})' if scope.branches == len(TICK_ROLES) else ''
  return f'branch {scope.branch}{role}'


def collectives(text: str) -> list[dict]:
  """Every collective of the module, in schedule order per computation: one record per
  synchronous op and per asynchronous pair (or unpaired half)."""
  comps, entry = parse_module(text)
  records = []
  for comp, scope in scopes(comps, entry).items():
    instrs = comps[comp]
    by_name = {i.name: i for i in instrs}
    position = {i.name: n for n, i in enumerate(instrs)}
    paired = set()
    base = {'computation': comp, 'location': _location(scope), 'path': scope.path}
    for n, ins in enumerate(instrs):
      kind = _kind(ins, comps, by_name)
      if kind is None or kind[1] in ('start', 'update'):
        continue
      record = {
        **base,
        'kind': kind[0],
        'name': ins.name,
        'op_name': _op_name(ins),
        'executions': scope.executions,
      }
      if kind[1] == 'sync':
        # The GPU compiler prints a pair it scheduled with nothing between as one op, with
        # is_sync and the start's scheduling name: an async collective that hid nothing.
        was_async = re.search(r'scheduling_name="[\w.\-]*-start[\d.]*"', ins.attrs) is not None
        group = {'group': _group(ins), 'bytes': _bytes(ins), 'was_async': was_async}
        records.append({**record, 'async': False, **group})
        continue
      start = _start_of(ins, comps, by_name)
      between, wraps = None, False
      if start is not None and position[start.name] < n:
        between = instrs[position[start.name] + 1 : n]
      else:
        start = _loop_carried_start(ins, instrs)
        kind_of_start = None if start is None else _kind(start, comps, by_name)
        if kind_of_start is not None and kind_of_start[1] == 'start':
          # The rest of one iteration after the start, and the next one's head before the done.
          between, wraps = instrs[position[start.name] + 1 :] + instrs[:n], True
      if between is None:
        records.append({**record, 'async': True, 'paired': False, 'bytes': _bytes(ins)})
        continue
      paired.add(start.name)
      records.append(
        {
          **record,
          'op_name': _op_name(start) or record['op_name'],
          'async': True,
          'paired': True,
          'start': start.name,
          'group': _group(start),
          'bytes': _bytes(ins) or _bytes(start),
          'is_sync': '"is_sync":true' in start.attrs,
          'is_pipelined': '"is_pipelined":true' in start.attrs,
          'across_iterations': wraps,
          **_between(between, comps),
        }
      )
    for ins in instrs:  # starts whose done is in another computation
      kind = _kind(ins, comps, by_name)
      if kind and kind[1] == 'start' and ins.name not in paired:
        unpaired = {'kind': kind[0], 'name': ins.name, 'op_name': _op_name(ins)}
        # Its done's result is elsewhere: the bytes of the start's (operands and result).
        unpaired.update(bytes=_bytes(ins), executions=scope.executions)
        records.append({**base, **unpaired, 'async': True, 'paired': False})
  return records


def _bytes(ins: Instruction) -> int:
  return hlo.type_bytes(ins.result)


def _between(instrs: list[Instruction], comps) -> dict:
  compute = [i for i in instrs if _is_compute(i, comps)]
  matmuls = [i.name for i in compute if _holds_matmul(i, comps)]
  control = [i.name for i in compute if i.opcode in _CONTROL]
  others = [i.name for i in instrs if (k := _kind(i, comps)) and k[1] != 'update']
  return {
    'between': len(instrs),
    'compute': len(compute),
    'matmuls': len(matmuls),
    'control': len(control),
    'collectives_between': len(others),
    'compute_names': [i.name for i in compute[:MAX_NAMES]],
    'matmul_names': matmuls[:MAX_NAMES],
    'control_names': control[:MAX_NAMES],
  }


def summarise(records: list[dict]) -> dict:
  """Counts and bytes per collective kind and per location, and in all.

  Per group: `sync` ops (`sync_was_async`: scheduled as a pair, converted to one op since
  nothing was put between); `async` pairs, of which `overlapped` have compute between start and
  done, `overlapped_heavy` a matmul or a nested conditional/loop, `marked_sync` carry XLA's
  is_sync; `unpaired` halves (start and done in different computations). Bytes count each op of
  the text once (`bytes_*`) and, where every loop's trip count is known, per step
  (`bytes_*_per_step`, weighted by executions; None otherwise).
  """

  def group_of(rs):
    out = {}
    classes = {
      'sync': [r for r in rs if not r['async']],
      'sync_was_async': [r for r in rs if not r['async'] and r['was_async']],
      'async': [r for r in rs if r['async'] and r['paired']],
      'overlapped': [r for r in rs if r['async'] and r['paired'] and r['compute'] > 0],
      'overlapped_heavy': [
        r for r in rs if r['async'] and r['paired'] and r['matmuls'] + r['control'] > 0
      ],
      'marked_sync': [r for r in rs if r['async'] and r['paired'] and r['is_sync']],
      'unpaired': [r for r in rs if r['async'] and not r['paired']],
    }
    for name, members in classes.items():
      out[name] = len(members)
      out[f'bytes_{name}'] = sum(r['bytes'] for r in members)
      steps = [r['executions'] for r in members]
      out[f'bytes_{name}_per_step'] = (
        None if None in steps else sum(r['bytes'] * r['executions'] for r in members)
      )
    return out

  by = lambda key: {
    k: group_of([r for r in records if r[key] == k]) for k in sorted({r[key] for r in records})
  }
  return {'all': group_of(records), 'by_kind': by('kind'), 'by_location': by('location')}


# ---------------------------------------------------------------------------------------------
# One variant: compile and analyse (in its own process, XLA_FLAGS set by the caller).
# ---------------------------------------------------------------------------------------------


def _overrides(args) -> tuple[object, dict]:
  """The config module and dotted overrides: the smoke config, or memory.py's paper row."""
  from memory import PAPER, PLACEMENTS

  from configs import paper, tiny

  if args.smoke:
    module, overrides = tiny, dict(SMOKE)
  else:
    # cuDNN flash attention on the GPU compile (what a GPU run uses), the XLA attention on CPU.
    attention = {'model.attention_impl': 'cudnn' if args.gpu_topology else 'xla'}
    module, overrides = paper, {**PAPER, **attention, **PLACEMENTS['ma_sep 12:4']}
  for item in args.set:
    key, value = item.split('=', 1)
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return module, overrides


def analyse_variant(args) -> dict:
  """Compiles the train step in this process and returns its collectives and summary."""
  import jax
  from planner_memory import _config, _devices

  from mas_jax import strategies, train_lib

  # A fresh compile per variant: its time is the compiler's, not a cache read.
  jax.config.update('jax_enable_compilation_cache', False)
  devices = _devices(args.gpu_topology)
  module, overrides = _overrides(args)
  config = _config(module, overrides)
  strategy = strategies.get(config, devices)
  start = time.perf_counter()
  compiled = train_lib.compile_abstract_train_step(config, strategy)
  seconds = time.perf_counter() - start
  text = compiled.as_text()
  if args.hlo_dir:
    os.makedirs(args.hlo_dir, exist_ok=True)
    with gzip.open(os.path.join(args.hlo_dir, f'{args.worker}.hlo.txt.gz'), 'wt') as f:
      f.write(text)
  records = collectives(text)
  mem = compiled.memory_analysis()
  return {
    'jax': jax.__version__,
    'device_kind': devices[0].device_kind,
    'overrides': overrides,
    'dispatch': strategy.dispatch,
    'ticks': len(strategy.ticks),
    'compile_s': round(seconds, 1),
    'temporaries': None if mem is None else mem.temp_size_in_bytes,
    'summary': summarise(records),
    'collectives': records,
  }


def run_variant(args, name: str, flags: str) -> dict:
  """Runs `analyse_variant` in a child process with XLA_FLAGS = the caller's + `flags`."""
  base = os.environ.get('XLA_FLAGS', '')
  if not args.gpu_topology and 'xla_force_host_platform_device_count' not in base:
    base += ' --xla_force_host_platform_device_count=16'
  env = {**os.environ, 'XLA_FLAGS': f'{base} {flags}'.strip()}
  env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # the compile allocates nothing
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'variant.json')
    cmd = [sys.executable, os.path.abspath(__file__), *_forwarded(args)]
    cmd += ['--worker', name, '--worker_out', out]
    start = time.perf_counter()
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
      return {'flags': flags, 'error': f'no result within --timeout={args.timeout} s'}
    result = {'flags': flags, 'xla_flags': env['XLA_FLAGS']}
    if proc.returncode != 0 or not os.path.exists(out):
      unknown = re.search(r'Unknown flag[^\n]*', proc.stderr)
      tail = proc.stderr.strip().splitlines()[-15:]
      error = unknown.group(0) if unknown else f'exit code {proc.returncode}'
      return {**result, 'error': error, 'stderr_tail': tail}
    with open(out) as f:
      result.update(json.load(f))
  result['wall_s'] = round(time.perf_counter() - start, 1)
  return result


def _forwarded(args) -> list[str]:
  """The command-line arguments that shape the compile, for the child process."""
  out = [f'--gpu_topology={args.gpu_topology}'] if args.gpu_topology else []
  out += ['--smoke'] if args.smoke else []
  out += [f'--set={s}' for s in args.set]
  out += [f'--hlo_dir={args.hlo_dir}'] if args.hlo_dir else []
  return out


# ---------------------------------------------------------------------------------------------
# --roles: each role's work of one tick, timed on one device, over the tick schedule.
# ---------------------------------------------------------------------------------------------


def _local_layer(strategy, config, key) -> dict:
  """One layer's weights as one device holds them (slot axes split over every device), random
  (matmul weights in the compute dtype, norm scales float32 ones), on the default device."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding

  from mas_jax import model as model_lib

  reference = jax.eval_shape(lambda: model_lib.init_params(config))
  abstract = jax.eval_shape(strategy.from_reference, reference)
  specs = strategy.param_specs(abstract)['blocks']
  dtype = jnp.dtype(config.model.compute_dtype)

  def make(path, a, spec):
    shape = NamedSharding(strategy.mesh, spec).shard_shape(a.shape)[1:]  # [L, ...] -> one layer
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.ones(shape, jnp.float32)
    k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()))
    return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

  return jax.tree_util.tree_map_with_path(make, abstract['blocks'], specs)


def _expert_tick(strategy, p, h, key):
  """The expert devices' work of a tick on h[b, T, D], as `_moe_part_all_to_all` does it, with
  its all_to_all and all_gather replaced by reshapes of the same bytes (no peer to talk to):
  route this device's b/n sequences, run its E/n experts on every sequence's slots, combine."""
  import jax.numpy as jnp

  from mas_jax.layers import moe as moe_lib

  cfg, lay = strategy.config.model, strategy.layout
  if strategy.dispatch == 'replicated':  # no collective inside: the strategy's own code
    return strategy._moe_part(p, h, key, lay.n_attn, 0)[0]
  share = h.shape[0] // lay.n_moe
  x, route, _, pos, cap = strategy._route(p, h[:share])
  xe = moe_lib.dispatch(x, route['experts'], pos, cfg.num_experts, cap)  # [b/n, E, C, D]
  xe = xe.reshape(h.shape[0], lay.local_experts, *xe.shape[2:])  # all_to_all: [b, E/n, C, D]
  ye = strategy._experts(p, xe, key, jnp.arange(h.shape[0]), jnp.arange(lay.local_experts))
  ye = ye.reshape(share, cfg.num_experts, *ye.shape[2:])  # all_to_all back: [b/n, E, C, D]
  y = moe_lib.combine(ye, route['experts'], pos, route['gates'])  # [b/n, T, D]
  return jnp.tile(y, (lay.n_moe, 1, 1))  # all_gather: [b, T, D]


def time_roles(args, repeats: int) -> dict:
  """Seconds of each role's forward tick and backward tick (the forward recomputed, then its
  VJP, as `_switch_into_sinks` runs it) at the step's micro-batch shape on this process's
  first device, and each role's busy and idle time per step over the tick schedule (a tick
  lasts as long as its slower role; collectives not counted)."""
  import jax
  import jax.numpy as jnp
  from common import bench
  from planner_memory import _config, _devices

  from mas_jax import strategies, train_lib
  from mas_jax.strategies import ma_separation

  module, overrides = _overrides(args)
  config = _config(module, overrides)
  # The strategy the step runs on each accumulation chunk (its dispatch mode follows the chunk).
  config = train_lib.micro_config(config) if config.train.grad_accum_steps > 1 else config
  strategy = strategies.get(config, _devices(args.gpu_topology))
  m = config.parallel.num_microbatches
  b, t, d = config.data.batch_size // m, config.data.seq_len, config.model.d_model
  dtype = jnp.dtype(config.model.compute_dtype)
  key = jax.random.key(0)
  p = _local_layer(strategy, config, key)
  x = (jax.random.normal(key, (b, t, d), jnp.float32)).astype(dtype)
  device = int(max(range(strategy.layout.n_attn), key=lambda i: len(strategy.layout.heads_of(i))))
  works = {
    'attention': lambda p, x: strategy._attention_part(p, x, device),
    'experts': lambda p, x: _expert_tick(strategy, p, x, key),
  }

  def backward_of(work):
    def backward(p, x):
      y, vjp = jax.vjp(work, p, x)
      return vjp(y)  # the output as its own cotangent: any array of its shape and dtype does

    return jax.jit(backward)

  seconds = {
    role: {
      'forward_s': bench(jax.jit(work), p, x, repeats=repeats),
      'backward_s': bench(backward_of(work), p, x, repeats=repeats),
    }
    for role, work in works.items()
  }
  ticks = ma_separation.schedule(config.model.num_layers, m)
  busy = {role: 0.0 for role in works}
  step = 0.0
  for phase in ('forward_s', 'backward_s'):
    for tick in ticks:
      times = {
        'attention': seconds['attention'][phase] if tick.attn else 0.0,
        'experts': seconds['experts'][phase] if tick.moe else 0.0,
      }
      step += max(times.values())
      for role, s in times.items():
        busy[role] += s
  chunks = config.train.grad_accum_steps
  return {
    'device_kind': jax.devices()[0].device_kind,
    'micro_batch': [b, t, d],
    'dispatch': strategy.dispatch,
    'head_slots': strategy.layout.head_slots,
    'local_experts': strategy.layout.local_experts,
    'chunks': chunks,
    'schedule': ma_separation.schedule_picture(ticks),
    'ticks': seconds,
    'step_compute_s': step * chunks,
    'per_step': {
      role: {'busy_s': busy[role] * chunks, 'idle_s': (step - busy[role]) * chunks}
      for role in works
    },
  }


def roles_table(roles: dict) -> str:
  ms = lambda s: f'{s * 1e3:.4g}'
  lines = [
    f'Roles on one {roles["device_kind"]}: micro-batch {roles["micro_batch"]}, '
    f'{roles["head_slots"]} head slots, {roles["local_experts"]} local experts, '
    f'{roles["dispatch"]} dispatch (its collectives replaced by reshapes); per step '
    f'{roles["chunks"]} chunks of the schedule below, forward then backward; a tick lasts as '
    'long as its slower role, collectives not counted.',
    '',
    roles['schedule'],
    '',
    '| role | forward tick (ms) | backward tick (ms) | busy per step (ms) | idle per step (ms) '
    '| idle share |',
    '|---|---|---|---|---|---|',
  ]
  for role, t in roles['ticks'].items():
    per = roles['per_step'][role]
    share = per['idle_s'] / roles['step_compute_s'] if roles['step_compute_s'] else 0.0
    lines.append(
      f'| {role} | {ms(t["forward_s"])} | {ms(t["backward_s"])} | {ms(per["busy_s"])} '
      f'| {ms(per["idle_s"])} | {share:.1%} |'
    )
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Tables and the command line.
# ---------------------------------------------------------------------------------------------


def _mb(group: dict, name: str) -> str:
  per_step = group[f'bytes_{name}_per_step']
  return f'{(group[f"bytes_{name}"] if per_step is None else per_step) / 1e6:.4g}'


def table(result: dict) -> str:
  """Markdown: one row per variant, then one per (variant, location, kind)."""
  lines = [
    f'{result["target"]}; {result["config"]}. "overlapped": an async pair with compute between '
    'start and done (heavy: a matmul or a nested conditional/loop between). MB per step '
    '(each op of the HLO text once where a loop trip count is unknown).',
    '',
    '| variant | compile (s) | sync (was async) | async | overlapped (heavy) | marked is_sync '
    '| unpaired | MB sync | MB async | MB overlapped (heavy) |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  detail = [
    '',
    '| variant | location | kind | sync | async | overlapped (heavy) | MB sync | MB async '
    '| MB overlapped (heavy) |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for name, v in result['variants'].items():
    if 'error' in v:
      lines.append(f'| {name} | failed: {v["error"]} |' + ' |' * 8)
      continue
    a = v['summary']['all']
    lines.append(
      f'| {name} | {v["compile_s"]} | {a["sync"]} ({a["sync_was_async"]}) | {a["async"]} '
      f'| {a["overlapped"]} ({a["overlapped_heavy"]}) | {a["marked_sync"]} | {a["unpaired"]} '
      f'| {_mb(a, "sync")} | {_mb(a, "async")} | {_mb(a, "overlapped")} '
      f'({_mb(a, "overlapped_heavy")}) |'
    )
    for location in sorted({r['location'] for r in v['collectives']}):
      for kind in sorted({r['kind'] for r in v['collectives'] if r['location'] == location}):
        rs = [r for r in v['collectives'] if r['location'] == location and r['kind'] == kind]
        g = summarise(rs)['all']
        detail.append(
          f'| {name} | {location} | {kind} | {g["sync"]} | {g["async"]} | {g["overlapped"]} '
          f'({g["overlapped_heavy"]}) | {_mb(g, "sync")} | {_mb(g, "async")} '
          f'| {_mb(g, "overlapped")} ({_mb(g, "overlapped_heavy")}) |'
        )
  return '\n'.join(lines + detail)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gpu_topology', default=None, help="e.g. '1x1x16' (needs one GPU)")
  parser.add_argument('--smoke', action='store_true', help='the tiny config on 16 CPU devices')
  parser.add_argument('--variants', default='', help='comma-separated names of VARIANTS to run')
  parser.add_argument('--set', action='append', default=[], help="config override 'a.b=value'")
  parser.add_argument('--out', default=None, help='JSON path (default under docs/benchmarks)')
  parser.add_argument('--hlo_dir', default=None, help="also write each variant's HLO (gzip)")
  parser.add_argument('--timeout', type=int, default=3600, help='seconds per variant')
  parser.add_argument('--roles', action='store_true', help='also time each role of one tick')
  parser.add_argument('--repeats', type=int, default=10, help='timed calls per role (--roles)')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--worker_out', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if args.worker:
    with open(args.worker_out, 'w') as f:
      json.dump(analyse_variant(args), f)
    return {}
  # The flags steer the GPU compiler; on CPU only the default compile means anything.
  names = list(VARIANTS) if args.gpu_topology else ['default']
  if args.variants:  # 'none': only --roles
    names = [n for n in args.variants.split(',') if n in VARIANTS]
  suffix = '_smoke' if args.smoke else ('' if args.gpu_topology else '_cpu')
  out = args.out or f'docs/benchmarks/overlap{suffix}.json'
  command = ' '.join(['python bench/overlap.py', *(sys.argv[1:] if argv is None else argv)])
  result = {
    'commands': [command],
    'target': f'{args.gpu_topology} GPU topology' if args.gpu_topology else '16 CPU devices',
    'topology': args.gpu_topology,
    'config': 'tiny (smoke)' if args.smoke else 'paper, ma_sep 12:4 (bench/memory.py row)',
    'set': args.set,
    'variants': {},
  }
  result = _merge(result, out, names, args.roles)
  for name in names:
    v = run_variant(args, name, VARIANTS[name])
    result['variants'][name] = v
    if 'device_kind' in v and args.gpu_topology:
      result['target'] = f'{args.gpu_topology} x {v["device_kind"]}'
    if 'error' in v:
      print(f'{name}: failed: {v["error"]}', flush=True)
    else:
      a = v['summary']['all']
      print(
        f'{name}: compiled in {v["compile_s"]} s: {a["sync"]} sync, {a["async"]} async '
        f'({a["overlapped"]} overlapped)',
        flush=True,
      )
    _write(out, result)  # after every variant, so a long run keeps what it has
  if result['variants']:
    print(table(result))
  if args.roles:
    # In this process, after the variants' children have given the device back.
    result['roles'] = time_roles(args, args.repeats)
    _write(out, result)
    print('\n' + roles_table(result['roles']))
  return result


def _merge(result: dict, out: str, names: list[str], roles: bool) -> dict:
  """`result` with what an earlier run of the same compile left in `out`: its variants that
  this run does not redo, its roles unless this run times them (so a long GPU run can be split
  over several calls, e.g. --variants=default,lhs then --variants=no_lhs,...)."""
  if not os.path.exists(out):
    return result
  with open(out) as f:
    old = json.load(f)
  if any(old.get(k) != result[k] for k in ('topology', 'config', 'set')):
    return result
  merged = {**result, 'target': old['target'], 'commands': old['commands'] + result['commands']}
  merged['variants'] = {k: v for k, v in old['variants'].items() if k not in names}
  if not roles and 'roles' in old:
    merged['roles'] = old['roles']
  return merged


def _write(out: str, result: dict) -> None:
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  order = list(VARIANTS)
  variants = dict(sorted(result['variants'].items(), key=lambda kv: order.index(kv[0])))
  with open(out, 'w') as f:
    json.dump({**result, 'variants': variants}, f, indent=1)


if __name__ == '__main__':
  main()
