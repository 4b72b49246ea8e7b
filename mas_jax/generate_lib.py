"""Generation from a train.py run: restore its params, tokenize prompts, generate, write results.

The library behind `generate.py`, importable without it (the tests call `generate` directly):

  cd = generate_lib.load_run_config(workdir)    # the run's config.json as a ConfigDict
  cd.parallel.strategy = 'dp'                    # optional: overrides apply to generation only
  out = generate_lib.generate(cd, workdir, ['Return the', 'The'], max_new_tokens=16)
  print(generate_lib.report(out))

Restoring goes through the strategy the run *trained* with (its config.json): the checkpoint
holds parameters in that strategy's layout (e.g. ma_sep's head and expert slots), or with
parallel.shard_optimizer in the reference layout split over all devices (`zero.ParamLayout`),
so they are restored into that layout's abstract parameters and shardings (orbax partial
restore: the optimizer state is never read) and converted to the reference layout. Generation
then runs under the strategy of the possibly overridden config (`decode.Generator`).

Every bad input raises one ConfigError before anything is restored or compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import jax
import ml_collections
import orbax.checkpoint as ocp
import sentencepiece as spm
from absl import logging

from mas_jax import checkpoint as checkpoint_lib
from mas_jax import config as config_lib
from mas_jax import decode, strategies, zero
from mas_jax import workdir as workdir_lib
from mas_jax.config import Config, ConfigError
from mas_jax.data import c4, sample

# Model fields that fix the parameter shapes: generation cannot override them.
_SHAPE_FIELDS = ('vocab_size', 'num_layers', 'd_model', 'num_heads', 'num_experts', 'expert_hidden')


# ---------------------------------------------------------------------------------------------
# The run: config and checkpoint.
# ---------------------------------------------------------------------------------------------


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config in effect (config.json and any accepted changes, see mas_jax.workdir)."""
  config = workdir_lib.current_config(workdir)
  if config is None:
    raise ConfigError(f'--workdir={workdir} has no config.json: not a train.py workdir')
  return ml_collections.ConfigDict(config)


def _checkpoints(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def latest_step(workdir: str) -> int:
  """Step of the latest checkpoint in workdir/checkpoints; ConfigError if there is none."""
  directory = _checkpoints(workdir)
  step = None
  if os.path.isdir(directory):
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager(directory, options=options) as mgr:
      step = mgr.latest_step()
  if step is None:
    raise ConfigError(f'--workdir={workdir} has no checkpoint in {directory}')
  return step


def restore_params(workdir: str, devices: list | None = None) -> tuple[dict, int]:
  """Params of the latest checkpoint in the reference layout, and its step.

  The params are checked against the checkpoint's checksums (CheckpointError if damaged).

  The run's own strategy (config.json) gives the checkpoint's layout and the shardings to
  restore into, so it must be buildable on `devices` (e.g. ma_sep 12:4 needs 16 devices).
  """
  run_config = config_lib.from_config_dict(load_run_config(workdir))
  step = latest_step(workdir)
  try:
    strategy = strategies.get(run_config, devices)
  except ConfigError as e:
    name = run_config.parallel.strategy
    raise ConfigError(
      f'the checkpoint is in the layout of parallel.strategy={name!r}, which cannot be built '
      f'on these devices to restore it: {e}'
    ) from None
  layout = zero.ParamLayout(run_config, strategy)  # the strategy's, or the sharded reference
  target = {
    'params': jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      layout.abstract(),
      layout.shardings(),
    )
  }
  if (placement := layout.placement_abstract()) is not None:  # parallel.rebalance_every
    target['placement'] = jax.ShapeDtypeStruct(
      placement.shape, placement.dtype, sharding=strategy.replicated()
    )
  state_args = ocp.args.PyTreeRestore(
    item=target,
    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
    partial_restore=True,  # params (and the expert placement): step and opt_state are not read
  )
  options = ocp.CheckpointManagerOptions(create=False)
  with ocp.CheckpointManager(_checkpoints(workdir), options=options) as mgr:
    restored = mgr.restore(
      step, args=ocp.args.Composite(state=state_args, integrity=ocp.args.JsonRestore())
    )
  checkpoint_lib.verify_arrays({'params': restored['state']['params']}, restored['integrity'], step)
  params = jax.jit(layout.to_reference, donate_argnums=0)(
    restored['state']['params'], restored['state'].get('placement')
  )
  logging.info(
    'Restored the params of step %d from %s (trained with parallel.strategy=%s).',
    step,
    workdir,
    run_config.parallel.strategy,
  )
  return params, step


def check_same_model(run: Config, config: Config) -> None:
  """Generation may override anything but the fields that fix the checkpoint's shapes."""
  changed = [
    f'model.{f}={getattr(config.model, f)} (the checkpoint has {getattr(run.model, f)})'
    for f in _SHAPE_FIELDS
    if getattr(config.model, f) != getattr(run.model, f)
  ]
  if changed:
    raise ConfigError(f'cannot override the shape of the trained model: {", ".join(changed)}')


# ---------------------------------------------------------------------------------------------
# Tokenizer and prompts.
# ---------------------------------------------------------------------------------------------


def tokenizer_path(data: config_lib.DataConfig, vocab_size: int) -> str:
  """The SentencePiece model training used, resolved as `mas_jax.data.c4.C4Source` does."""
  if data.tokenizer_path:
    return data.tokenizer_path
  data_dir = data.data_dir or c4.DEFAULT_DATA_DIR
  if data.source != 'c4' or not sample.is_sample(data_dir, data.version):
    raise ConfigError(
      f'data.tokenizer_path is empty and the run (data.source={data.source!r}, '
      f'data.data_dir={data_dir!r}) used no embedded-sample tokenizer: pass '
      '--config.data.tokenizer_path=MODEL'
    )
  return os.path.join(data_dir, f'mas_jax_sample_spm_{vocab_size}.model')


def load_tokenizer(data: config_lib.DataConfig, vocab_size: int) -> spm.SentencePieceProcessor:
  """The run's tokenizer; its piece count must equal the checkpoint's model.vocab_size."""
  path = tokenizer_path(data, vocab_size)
  if not os.path.exists(path):
    raise ConfigError(f'tokenizer {path} does not exist')
  sp = spm.SentencePieceProcessor(model_file=path)
  pieces = sp.get_piece_size()
  if pieces != vocab_size:
    which = 'more' if pieces > vocab_size else 'fewer'
    raise ConfigError(
      f"tokenizer {path} has {pieces} pieces, {which} than the checkpoint's "
      f'model.vocab_size={vocab_size}'
    )
  if sp.eos_id() < 0:
    raise ConfigError(f'tokenizer {path} has no EOS piece to stop generation at')
  return sp


def read_prompts(prompts: list[str], prompts_file: str | None = None) -> list[str]:
  """The --prompt values, then the non-blank lines of --prompts_file (one prompt a line)."""
  prompts = list(prompts or [])
  if prompts_file:
    if not os.path.exists(prompts_file):
      raise ConfigError(f'--prompts_file={prompts_file} does not exist')
    with open(prompts_file) as f:
      prompts += [line.rstrip('\r\n') for line in f if line.strip()]
  return prompts


# ---------------------------------------------------------------------------------------------
# Generation and its outputs.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Completion:
  """One prompt's result; `tokens` excludes the EOS that stopped it."""

  prompt: str
  prompt_tokens: list[int]
  tokens: list[int]
  text: str
  stopped_at_eos: bool


@dataclasses.dataclass
class Generation:
  completions: list[Completion]
  result: decode.Result  # timings and batch
  strategy: str
  step: int  # checkpoint step
  context: int


def generate(
  config_dict: ml_collections.ConfigDict,
  workdir: str,
  prompts: list[str],
  *,
  max_new_tokens: int = 32,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  context: int | None = None,
  output: str | None = None,
  devices: list | None = None,
) -> Generation:
  """Completes `prompts` (text) with the latest checkpoint of the train.py run in `workdir`.

  Args:
    config_dict: the run's config (`load_run_config`) with any generation overrides applied.
    context: KV cache positions (default: data.seq_len); every prompt + completion must fit.
    output: a JSONL file to write atomically, one object per prompt.
    devices: devices of the generation strategy (default: all).

  Raises:
    ConfigError: bad input, before any parameter is restored or program compiled.
  """
  # Checks, all before any work.
  run_config = config_lib.from_config_dict(load_run_config(workdir))
  latest_step(workdir)
  config = config_lib.from_config_dict(config_dict)
  check_same_model(run_config, config)
  decode.check_sampling(temperature, top_k, top_p)
  if not prompts:
    raise ConfigError('no prompt given: pass --prompt=TEXT (repeatable) or --prompts_file=FILE')
  tokenizer = load_tokenizer(config.data, run_config.model.vocab_size)
  prompt_ids = [tokenizer.encode(p) for p in prompts]
  context = config.data.seq_len if context is None else context
  # Validates the generation strategy and its split, the lengths and the ids (no params needed).
  decode.Generator(config, {}, context, devices).check(prompt_ids, max_new_tokens)
  if output and not os.path.isdir(os.path.dirname(os.path.abspath(output))):
    raise ConfigError(f'--output={output}: its directory does not exist')

  params, step = restore_params(workdir, devices)
  generator = decode.Generator(config, params, context, devices)
  sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id())
  result = generator.generate(prompt_ids, max_new_tokens, **sampling, seed=seed)
  completions = [
    Completion(text, ids, tokens, continuation(tokenizer, ids, tokens), eos)
    for text, ids, tokens, eos in zip(
      prompts, prompt_ids, result.tokens, result.stopped_at_eos, strict=True
    )
  ]
  if output and jax.process_index() == 0:
    write_jsonl(output, [dataclasses.asdict(c) for c in completions])
  return Generation(completions, result, config.parallel.strategy, step, context)


def continuation(tokenizer: spm.SentencePieceProcessor, prompt: list[int], new: list[int]) -> str:
  """The text `new` adds after `prompt`: with its leading space, so prompt + text reads right."""
  before = tokenizer.decode(prompt)
  after = tokenizer.decode(prompt + new)
  return after[len(before) :] if after.startswith(before) else tokenizer.decode(new)


def write_jsonl(path: str, records: list[dict]) -> None:
  """Writes one JSON object a line under a temporary name, then renames: never half-written."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path), suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      for record in records:
        f.write(json.dumps(record) + '\n')
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def report(gen: Generation) -> str:
  """The completions as text (prompt, then completion), then strategy, batch and timings."""
  lines = []
  for i, c in enumerate(gen.completions):
    stop = 'EOS' if c.stopped_at_eos else 'max_new_tokens'
    lines += [
      f'[prompt {i}, {len(c.prompt_tokens)} tokens] {c.prompt}',
      f'[completion {i}, {len(c.tokens)} tokens, stopped at {stop}] {c.text}',
      '',
    ]
  r, n = gen.result, len(gen.completions)
  lines += [
    f'strategy: {gen.strategy}, batch {r.batch} ({n} prompts + {r.batch - n} padding rows), '
    f'checkpoint step {gen.step}, context {gen.context}',
    f'prefill: {r.prefill_s * 1e3:.2f} ms',
    f'TPOT: {r.tpot_s * 1e3:.3f} ms (median of {len(r.step_s)} decode steps)',
    f'tokens/s: {r.tokens_per_s:.1f} ({r.generated} tokens generated)',
  ]
  return '\n'.join(lines)
