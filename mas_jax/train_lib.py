"""Train state, optimizer, jitted train/eval steps, and the training loop.

Strategy-agnostic: the strategy named by `config.parallel.strategy` supplies the mesh, the
parameter and batch shardings and the loss; everything here works for all of them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import signal
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mas_jax import checkpoint as checkpoint_lib
from mas_jax import config as config_lib
from mas_jax import data as data_lib
from mas_jax import distributed, rebalance, strategies, zero
from mas_jax import logs as logs_lib
from mas_jax import metrics as metrics_lib
from mas_jax import workdir as workdir_lib
from mas_jax.config import Config, TrainConfig
from mas_jax.layers import moe as moe_lib
from mas_jax.model import init_params  # noqa: F401  (the trainer's API; defined beside the model)
from mas_jax.perf import planner
from mas_jax.perf.model import ModelSpec
from mas_jax.perf.prediction import Workload
from mas_jax.workdir import RunError

# ---------------------------------------------------------------------------------------------
# parallel.*='auto': the planner's ma_sep split.
# ---------------------------------------------------------------------------------------------


def resolve_auto_placement(
  config: Config, config_dict: ml_collections.ConfigDict, devices: Sequence | None = None
) -> tuple[Config, ml_collections.ConfigDict]:
  """Replaces parallel.attn_devices / moe_devices / num_microbatches = 'auto' by the planner's.

  The planner (`mas_jax.perf.planner.choose_ma_sep_split`) ranks every ma_sep split of the
  device count the strategy accepts, at this config's model, batch, seq_len and
  train.grad_accum_steps, on the hardware `parallel.hardware` names for the device kind
  (`planner.hardware_for_device`); fields given as numbers are held fixed (a given
  num_microbatches is the only M tried). One INFO block logs the top three splits, their step
  times, M and accumulation, and why the best wins. Pure Python and deterministic: every process
  of a multi-process run, and every resume on the same devices, resolves the same numbers.

  Returns:
    The resolved Config (validated again) and a copy of config_dict holding the same numbers,
    which is what the run's config.json records; both unchanged when nothing is 'auto'.

  Raises:
    ConfigError: one line when no split is valid on the device count, or for a bad
      parallel.hardware.
  """
  p = config.parallel
  auto = p.auto_fields
  if not auto:
    return config, config_dict
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  fixed = {f: None if f in auto else getattr(p, f) for f in config_lib.AUTO_FIELDS}
  w = Workload(
    'train',
    config.data.batch_size,
    config.data.seq_len,
    config.train.grad_accum_steps,
    shard_optimizer=p.shard_optimizer,
    shard_gradients=p.shard_gradients,
  )
  try:
    hw, cal, hardware = planner.hardware_for_device(
      devices[0].device_kind, p.hardware, config.model.compute_dtype
    )
    best, ranked, reason = planner.choose_ma_sep_split(
      ModelSpec.from_config(config),
      hw,
      w,
      n,
      cal,
      attn_devices=fixed['attn_devices'],
      moe_devices=fixed['moe_devices'],
      microbatches=fixed['num_microbatches'],
      dispatch=p.moe_dispatch,
      hierarchical=p.hierarchical_allreduce,
      attn_sharding=p.attn_sharding,
    )
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  attn, moe = (int(x) for x in best.split.split(':'))
  chosen = {'attn_devices': attn, 'moe_devices': moe, 'num_microbatches': best.microbatches}
  resolved = {f: chosen[f] for f in auto}
  block = planner.describe_ma_sep_choice(
    best, ranked, reason, n, hardware, accumulation=config.train.grad_accum_steps
  )
  given = [f'{f}={fixed[f]} (given)' for f in config_lib.AUTO_FIELDS if f not in auto]
  logging.info(
    '%s\n  Running parallel.%s%s.',
    block,
    ', parallel.'.join(f'{f}={v}' for f, v in resolved.items()),
    f'; {", ".join(given)}' if given else '',
  )
  config = dataclasses.replace(config, parallel=dataclasses.replace(p, **resolved))
  config_lib.validate(config)
  config_dict = copy.deepcopy(config_dict)
  with config_dict.ignore_type():
    for f, v in resolved.items():
      config_dict.parallel[f] = v
  return config, config_dict


# ---------------------------------------------------------------------------------------------
# Optimizer and state.
# ---------------------------------------------------------------------------------------------


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to end_lr_ratio * peak at the last step.

  Warmup is clamped to steps - 1, so a short run (`--config.train.steps=20`) still decays.
  """
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.learning_rate,
    warmup_steps=min(cfg.warmup_steps, cfg.steps - 1),
    decay_steps=cfg.steps,
    end_value=cfg.learning_rate * cfg.end_lr_ratio,
  )


def decay_mask(params: dict) -> dict:
  """True for parameters that get weight decay: everything but norm scales and biases."""

  def decays(path, _):
    names = [str(getattr(k, 'key', k)) for k in path]
    return not any('norm' in n or 'bias' in n for n in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the warmup-cosine schedule.

  AdamW's first moment is held in train.mu_dtype (float32 or bfloat16; optax casts it after each
  update, and offers no such option for the second moment, which stays float32).
  With train.skip_nonfinite_steps = N > 0 the chain is wrapped in `optax.apply_if_finite`: a step
  whose gradients hold a NaN or inf leaves parameters and moments unchanged (the training loop
  stops the run once more than N steps were skipped).
  """
  tx = optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adamw(
      learning_rate_schedule(cfg),
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      mu_dtype=jnp.dtype(cfg.mu_dtype),
      weight_decay=cfg.weight_decay,
      mask=decay_mask,
    ),
  )
  if cfg.skip_nonfinite_steps:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=cfg.skip_nonfinite_steps)
  return tx


def state_shardings(layout: zero.ParamLayout, tx: optax.GradientTransformation) -> dict:
  """Shardings of the train state: optimizer moments follow their parameters."""
  param_sh = layout.shardings()
  abstract_opt = jax.eval_shape(tx.init, layout.abstract())
  replicated = layout.strategy.replicated()
  opt_sh = optax.tree_map_params(
    tx, lambda _, sh: sh, abstract_opt, param_sh, transform_non_params=lambda _: replicated
  )
  shardings = {'step': replicated, 'params': param_sh, 'opt_state': opt_sh}
  if layout.residual_abstract() is not None:
    shardings['residual'] = layout.residual_shardings()
  if layout.placement_abstract() is not None:  # parallel.rebalance_every: mas_jax/rebalance.py
    shardings['placement'] = shardings['expert_load'] = replicated
  return shardings


def create_train_state(layout: zero.ParamLayout, tx) -> tuple[dict, dict]:
  """Initializes the train state directly into its shardings; returns (state, shardings)."""
  shardings = state_shardings(layout, tx)

  def init():
    params = layout.init()
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
    if layout.residual_abstract() is not None:
      state['residual'] = jax.tree.map(
        lambda a: jnp.zeros(a.shape, a.dtype), layout.residual_abstract()
      )
    if (placement := layout.placement_abstract()) is not None:
      state['placement'] = jnp.arange(placement.shape[0], dtype=jnp.int32)  # expert e in slot e
      state['expert_load'] = jnp.zeros(placement.shape, jnp.float32)
    return state

  return jax.jit(init, out_shardings=shardings)(), shardings


def abstract_state(layout: zero.ParamLayout, tx) -> dict:
  """The train state's shapes, dtypes and shardings (nothing allocated)."""
  abstract = jax.eval_shape(
    lambda: {'step': jnp.zeros((), jnp.int32), 'opt_state': tx.init(layout.abstract())}
  )
  abstract['params'] = layout.abstract()
  if layout.residual_abstract() is not None:
    abstract['residual'] = layout.residual_abstract()
  if (placement := layout.placement_abstract()) is not None:
    abstract['placement'] = placement
    abstract['expert_load'] = jax.ShapeDtypeStruct(placement.shape, jnp.float32)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract,
    state_shardings(layout, tx),
  )


# ---------------------------------------------------------------------------------------------
# Steps.
# ---------------------------------------------------------------------------------------------


def micro_config(config: Config) -> Config:
  """The config one accumulation step sees: batch_size / grad_accum_steps sequences."""
  micro = config.data.batch_size // config.train.grad_accum_steps
  return dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=micro))


def cast_matmul_weights(params: dict, dtype) -> dict:
  """`params` with every float32 leaf but the norm scales and the embedding table in `dtype`.

  The modules cast these weights to the compute dtype where they use them; casting them once
  per step instead of once per micro-batch changes no value, gradients included (the cast's
  transpose is the identity on values). The norms compute in float32, and the embedding's
  gradient is a scatter-add that has to stay float32."""

  def cast(path, x):
    name = zero._name(path)
    keep = name.endswith('scale') or name == 'embed' or x.dtype != jnp.float32
    return x if keep else x.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, params)


# The expert weights whose gradients train.fuse_grad_accum sends into the accumulator.
_SUNK = ('w_in', 'w_out')


def with_grad_sinks(params: dict, acc: dict, scale: float) -> dict:
  """`params` with the accumulator's expert-weight entries beside the weights, as the GradSinks
  'w_in_sink' and 'w_out_sink' that moe.expert_ffn sends those weights' gradients into."""
  moe = dict(params['blocks']['moe'])
  for name in _SUNK:
    moe[f'{name}_sink'] = moe_lib.GradSink(acc['blocks']['moe'][name], scale)
  return {**params, 'blocks': {**params['blocks'], 'moe': moe}}


def add_into(acc: dict, grads: dict, steps: int, sunk: bool) -> dict:
  """acc + grads / steps in float32. `sunk` (train.fuse_grad_accum): `grads` is the gradient
  of `with_grad_sinks(params, acc, 1 / steps)`; its sinks' gradients are the expert weights' new
  sums (and those weights' own gradients, zero, are dropped)."""
  if sunk:
    g_moe = dict(grads['blocks']['moe'])
    sums = {name: g_moe.pop(f'{name}_sink').acc for name in _SUNK}
    grads = {**grads, 'blocks': {**grads['blocks'], 'moe': g_moe}}
  new = jax.tree.map(lambda a, g: a + g.astype(a.dtype) / steps, acc, grads)
  if sunk:
    new['blocks']['moe'].update(sums)
  return new


def accumulate(
  value_and_grad,
  params,
  batch: jax.Array,
  key,
  steps: int,
  grads_like=None,
  residual=None,
  fuse: bool = False,
):
  """Mean loss, metrics and gradients of `value_and_grad` over `steps` equal micro-batches.

  Micro-batch j holds rows j, j + steps, j + 2 * steps, ... of batch[B, T + 1], so each device
  keeps its own rows of a sequence-sharded batch (nothing moves between devices). Gradients are
  summed in float32 in a `lax.scan`, in an accumulator shaped like `grads_like` (default:
  `params`); micro-batch j draws dropout from fold_in(key, j).

  With a `residual` (parallel.grad_compression='topk'), value_and_grad(params, rows, key,
  residual) returns ((loss, metrics), grads, residual), the residual is carried from
  micro-batch to micro-batch, and so is the result: ((loss, metrics), grads, residual).

  With `fuse` (train.fuse_grad_accum; params in the reference layout, einsum experts) each
  micro-batch's params carry the accumulator's expert-weight entries as gradient sinks
  (`with_grad_sinks`): the expert weight-gradient GEMMs add into them in float32 (alpha = 1 /
  steps, beta = 1), and their gradients are the new sums.
  """
  compressed = residual is not None

  def call(params, rows, key, residual):
    if compressed:
      return value_and_grad(params, rows, key, residual)
    return (*value_and_grad(params, rows, key), None)

  if steps == 1:
    out = call(params, batch, key, residual)
    return out if compressed else out[:2]
  micro = jnp.swapaxes(batch.reshape(-1, steps, batch.shape[-1]), 0, 1)  # [steps, B/steps, T+1]

  def body(carry, xs):
    acc, residual = carry
    rows, j = xs
    (loss, metrics), grads, residual = call(
      with_grad_sinks(params, acc, 1 / steps) if fuse else params,
      rows,
      None if key is None else jax.random.fold_in(key, j),
      residual,
    )
    with jax.named_scope('accumulate'):
      acc = add_into(acc, grads, steps, sunk=fuse)
    return (acc, residual), (loss, metrics)

  zeros = jax.tree.map(
    lambda x: jnp.zeros(x.shape, jnp.float32), params if grads_like is None else grads_like
  )
  (grads, residual), (losses, metrics) = jax.lax.scan(
    body, (zeros, residual), (micro, jnp.arange(steps))
  )
  out = (jnp.mean(losses), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)), grads
  return (*out, residual) if compressed else out


def global_norm(tree) -> jax.Array:
  """The L2 norm of all leaves, scaled by the largest magnitude first so that it is finite
  whenever every leaf is (a plain sum of squares overflows float32 above about 1.8e19, and then
  a step whose gradients are all finite, and so not skipped, would report grad_norm=inf)."""
  leaves = jax.tree.leaves(tree)
  scale = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in leaves])
  scale = jnp.where(scale > 0, scale, 1.0)
  return scale * jnp.sqrt(sum(jnp.sum(jnp.square(x / scale)) for x in leaves))


def casts_once(config: Config, layout: zero.ParamLayout) -> bool:
  """Whether the train step casts the matmul weights to the compute dtype once per step: one
  device, several micro-batches, no sharded optimizer or gradient compression (on several
  devices the cast stays inside the strategy, where its transpose sums the replicated weights'
  gradients in float32). train.fuse_grad_accum needs this path.

  Raises:
    ConfigError: one line, for train.fuse_grad_accum where the step does not cast once.
  """
  once = (
    config.train.grad_accum_steps > 1
    and not layout.sharded
    and layout.residual_abstract() is None
    and len(layout.strategy.devices) == 1
  )
  if config.train.fuse_grad_accum and not once:
    raise config_lib.ConfigError(
      'train.fuse_grad_accum needs one device with train.grad_accum_steps > 1, unsharded '
      f'parameters and no gradient compression; got {len(layout.strategy.devices)} devices, '
      f'grad_accum_steps={config.train.grad_accum_steps}, sharded={layout.sharded}'
    )
  return once


def make_train_step(config: Config, layout: zero.ParamLayout, tx, shardings):
  """The jitted train step: (state, batch) -> (state, metrics); state buffers are donated.

  With train.grad_accum_steps = A > 1 the batch is processed as A micro-batches by a strategy
  built for batch_size / A (same devices and mesh), and the optimizer runs once per step. With
  parallel.shard_optimizer the loss is taken of the compute copy built once per step
  (`layout.to_compute`), and each chunk's gradients go back through its transpose into the
  sharded master's layout (see mas_jax/zero.py); with parallel.shard_gradients=False too, the
  chunks' gradients are summed in the compute layout (float32) and mapped back once.
  """
  strategy = layout.strategy
  base_key = jax.random.key(config.seed)
  schedule = learning_rate_schedule(config.train)
  steps = config.train.grad_accum_steps
  micro_strategy = (
    strategy if steps == 1 else strategies.get(micro_config(config), strategy.devices)
  )

  # parallel.shard_gradients=False (ZeRO-1): accumulate in the compute layout, map once per step.
  per_step = layout.sharded and not config.parallel.shard_gradients and steps > 1

  # parallel.grad_compression='topk': the error-feedback residual travels through the chunks.
  residual_in = layout.residual_abstract() is not None

  cast_once = casts_once(config, layout)

  def train_step(state, batch):
    dropout_key = jax.random.fold_in(base_key, state['step'])
    # parallel.rebalance_every: the expert -> slot table the parameters are placed by.
    placement = state.get('placement')

    extra = () if placement is None else (placement,)

    def strategy_value_and_grad(params, rows, key, *residual):
      if residual_in:
        return micro_strategy.value_and_grad_compressed(params, rows, key, *residual, *extra)
      return micro_strategy.value_and_grad(params, rows, key, *extra)

    compute, pullback = jax.vjp(lambda p: layout.to_compute(p, placement), state['params'])
    if cast_once:
      compute = cast_matmul_weights(compute, jnp.dtype(config.model.compute_dtype))
    residual = state.get('residual')
    if per_step:
      # The float32 map from the master to the strategy layout: its transpose takes the
      # float32 sum of every chunk's gradients (the cast's transpose is the identity on values).
      _, to_master = jax.vjp(lambda p: layout.to_strategy_layout(p, placement), state['params'])
      (_, metrics), grads, *residual = accumulate(
        strategy_value_and_grad, compute, batch, dropout_key, steps, residual=residual
      )
      grads = layout.constrain(to_master(grads)[0])
    else:

      def value_and_grad(params, rows, key, *residual):
        (loss, metrics), grads, *residual = strategy_value_and_grad(params, rows, key, *residual)
        if layout.sharded:
          grads = layout.constrain(pullback(grads)[0])
        return ((loss, metrics), grads, *residual)

      (_, metrics), grads, *residual = accumulate(
        value_and_grad,
        compute,
        batch,
        dropout_key,
        steps,
        grads_like=state['params'],
        residual=residual,
        fuse=config.train.fuse_grad_accum,
      )
    with jax.named_scope('optimizer'):
      updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
      params = optax.apply_updates(state['params'], updates)
    with jax.named_scope('grad_norm'):
      metrics['grad_norm'] = global_norm(grads)
    metrics['learning_rate'] = schedule(state['step'])
    if config.train.skip_nonfinite_steps:
      metrics['skipped_steps'] = opt_state.total_notfinite
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    if residual_in:
      new_state['residual'] = residual[0]
    if placement is not None:
      new_state['placement'] = placement
      new_state['expert_load'] = state['expert_load'] + metrics['expert_load']
    return new_state, metrics

  return jax.jit(
    train_step,
    in_shardings=(shardings, strategy.batch_sharding()),
    out_shardings=(shardings, strategy.replicated()),
    donate_argnums=0,
  )


def compile_train_step(
  config: Config, layout: zero.ParamLayout, tx, shardings, state, compiler_options=None
):
  """Compiles the train step once, ahead of time, and logs its memory use per device.

  The loop calls the compiled executable, so a shape or sharding change would fail loudly
  instead of recompiling silently. `compiler_options` go to XLA (`Lowered.compile`).
  """
  batch = jax.ShapeDtypeStruct(
    (config.data.batch_size, config.data.seq_len + 1),
    jnp.int32,
    sharding=layout.strategy.batch_sharding(),
  )
  abstract_state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
  )
  start = time.perf_counter()
  lowered = make_train_step(config, layout, tx, shardings).lower(abstract_state, batch)
  compiled = lowered.compile(compiler_options=compiler_options)
  logging.info('Compiled the train step in %.1f s.', time.perf_counter() - start)
  mem = compiled.memory_analysis()
  if mem is not None:
    logging.info(
      'Memory per device of the train step: arguments %.4g MB, outputs %.4g MB, '
      'temporaries (activations) %.4g MB, code %.4g MB.',
      mem.argument_size_in_bytes / 1e6,
      mem.output_size_in_bytes / 1e6,
      mem.temp_size_in_bytes / 1e6,
      mem.generated_code_size_in_bytes / 1e6,
    )
  return compiled


def compile_abstract_train_step(config: Config, strategy):
  """The train step compiled from the state's shapes alone (nothing allocated, so a model of any
  size compiles): for its memory analysis and HLO."""
  tx = make_optimizer(config.train)
  layout = zero.ParamLayout(config, strategy)
  shardings = state_shardings(layout, tx)
  return compile_train_step(config, layout, tx, shardings, abstract_state(layout, tx))


def make_eval_step(layout: zero.ParamLayout, param_shardings):
  """The jitted eval step: (params, batch, placement) -> metrics, no dropout; `placement` is
  the state's expert -> slot table (parallel.rebalance_every), None without one."""
  strategy = layout.strategy

  def eval_step(params, batch, placement):
    extra = {} if placement is None else {'placement': placement}
    return strategy.loss(layout.to_compute(params, placement), batch, None, **extra)[1]

  return jax.jit(
    eval_step,
    in_shardings=(param_shardings, strategy.batch_sharding(), strategy.replicated()),
    out_shardings=strategy.replicated(),
  )


def evaluate(
  eval_step,
  params,
  source,
  num_batches: int,
  sharding,
  global_shape: tuple[int, int],
  placement=None,
) -> dict[str, float]:
  """Mean of the eval metrics over the eval split's first num_batches batches."""
  totals: dict[str, float] = {}
  for batch in source.eval_batches(num_batches):
    batch = distributed.to_global(batch, sharding, global_shape)
    m = jax.device_get(eval_step(params, batch, placement))
    for name in ('loss', 'ce_loss'):
      totals[name] = totals.get(name, 0.0) + float(m[name]) / num_batches
  return {f'eval_{k}': v for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def _scalars(metrics: dict) -> dict[str, float]:
  """Flattens device metrics to JSON scalars; the expert load vector becomes expert_load_<e>."""
  out = {}
  for name, value in jax.device_get(metrics).items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[name] = float(value)
    else:
      out.update({f'{name}_{i}': float(v) for i, v in enumerate(value)})
  return out


def log_model_summary(config: Config, layout: zero.ParamLayout) -> None:
  counts = metrics_lib.param_count(config.model)
  flops = metrics_lib.train_flops_per_token(config.model, config.data.seq_len)
  logging.info(
    'Model: %.4g parameters (attention %.4g, moe %.4g, embeddings %.4g); %.4g active '
    'matmul parameters and %.4g training FLOPs per token.',
    counts['total'],
    counts['attention'],
    counts['moe'],
    counts['embeddings'],
    counts['active_matmul'],
    flops,
  )
  m = config.model
  if config.parallel.strategy in ('reference', 'dp'):
    impl = moe_lib.resolve_expert_impl(m.expert_impl, m.dropless, m.expert_dropout)
    logging.info('Experts: %s (model.expert_impl=%r).', impl, m.expert_impl)
  for line in layout.strategy.describe().splitlines():
    logging.info('%s', line)
  logging.info('%s', layout.describe())


class NonFiniteError(RunError):
  """The loss or gradient norm of a step is NaN or inf (and may not be skipped)."""


class _StopSignals:
  """SIGTERM/SIGINT: the first asks the loop to stop after saving, a second exits at once.

  Installed only in the main thread (signal handlers cannot be set elsewhere); the previous
  handlers come back on exit.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous: dict = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.received is not None:
      os.write(2, f'{name} again: exiting at once without saving.\n'.encode())
      os._exit(128 + signum)
    self.received = name
    logging.warning(
      '%s received: finishing this step, saving a checkpoint and exiting (send it again to '
      'exit at once).',
      name,
    )

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def stop_requested(self) -> bool:
    """True on every process once any process received a signal."""
    if jax.process_count() == 1:
      return self.received is not None
    return distributed.any_process(self.received is not None)


def _check_finite(step: int, metrics: dict, skip_limit: int, last_saved: int | None) -> None:
  """Raises NonFiniteError for a non-finite loss or gradient norm, unless it may be skipped."""
  values = jax.device_get(
    {k: metrics[k] for k in ('loss', 'grad_norm', 'skipped_steps') if k in metrics}
  )
  bad = [k for k in ('loss', 'grad_norm') if not np.isfinite(values[k])]
  if not bad:
    return
  what = ', '.join(f'{k}={float(values[k])}' for k in bad)
  if skip_limit and int(values['skipped_steps']) <= skip_limit:
    logging.warning(
      'step %d: %s; the update was skipped (%d of train.skip_nonfinite_steps=%d).',
      step,
      what,
      int(values['skipped_steps']),
      skip_limit,
    )
    return
  limit = f' after {skip_limit} skipped steps' if skip_limit else ''
  newest = f'step {last_saved}' if last_saved is not None else 'none'
  raise NonFiniteError(
    f'step {step}: {what}{limit}; the run stopped without saving it (newest checkpoint: '
    f'{newest}); lower train.learning_rate or set train.skip_nonfinite_steps'
  )


def restore(mgr, layout: zero.ParamLayout, tx, workdir: str) -> tuple[dict, dict, int] | None:
  """(state, data, step) of the newest good checkpoint in `layout`, None without any.

  A checkpoint saved in the other layout (parallel.shard_optimizer changed on resume, for a
  strategy whose layout is not the reference's, e.g. ma_sep) is restored in its own and
  converted; any other mismatch raises IncompatibleCheckpoint.
  """
  target = abstract_state(layout, tx)
  try:
    return checkpoint_lib.restore_latest_good(mgr, target, workdir)
  except checkpoint_lib.IncompatibleCheckpoint as e:
    config = layout.config
    flipped = dataclasses.replace(
      config,
      parallel=dataclasses.replace(config.parallel, shard_optimizer=not layout.sharded),
    )
    other = zero.ParamLayout(flipped, layout.strategy)
    try:
      restored = checkpoint_lib.restore_latest_good(mgr, abstract_state(other, tx), workdir)
    except checkpoint_lib.IncompatibleCheckpoint:
      raise e from None
  state, data, step = restored
  logging.info(
    'The checkpoint of step %d holds the parameters %s optimizer sharding: converted.',
    step,
    'without' if layout.sharded else 'with',
  )
  convert = jax.jit(
    lambda s: layout.convert_state(s, other, s.get('placement')),
    out_shardings=state_shardings(layout, tx),
  )
  return convert(state), data, step


def train_and_evaluate(
  config_dict: ml_collections.ConfigDict, workdir: str, resume_changed: Sequence[str] = ()
) -> dict[str, float]:
  """Trains config.train.steps steps (resuming from workdir), evaluating and checkpointing.

  Stops early, after saving, on SIGTERM or SIGINT. Raises ConfigError or RunError (one line
  each) for bad input, a changed config on resume, a locked workdir, no usable checkpoint, a
  non-finite loss or a failed save.

  Returns:
    The last logged metrics (train and eval).
  """
  config = config_lib.from_config_dict(config_dict)
  # parallel.*='auto' -> the planner's numbers, in config and in the config.json written below.
  config, config_dict = resolve_auto_placement(config, config_dict)
  strategy = strategies.get(config)  # validates the placement before any work
  layout = zero.ParamLayout(config, strategy)  # and the optimizer sharding
  casts_once(config, layout)  # train.fuse_grad_accum on the devices at hand
  batch_sharding = strategy.batch_sharding()
  global_shape = (config.data.batch_size, config.data.seq_len + 1)
  shard_index, shard_count = distributed.data_shard(batch_sharding, global_shape)
  source = data_lib.get_source(config, shard_index, shard_count)  # a bad data_dir fails here
  is_main = jax.process_index() == 0
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with contextlib.ExitStack() as stack:
    if is_main:
      stack.enter_context(workdir_lib.WorkdirLock(workdir))
    mgr = checkpoint_lib.manager(
      os.path.join(workdir, 'checkpoints'), config.train.keep_checkpoints
    )
    stack.callback(mgr.close)
    workdir_lib.check_identity(
      workdir,
      config_dict.to_json_best_effort(),
      list(resume_changed),
      mgr.latest_step(),
      write=is_main,
    )
    tx = make_optimizer(config.train)
    log_model_summary(config, layout)
    state, shardings = create_train_state(layout, tx)
    restored = restore(mgr, layout, tx, workdir)
    data_state = None
    if restored is not None:
      state, saved_data, restored_step = restored
      data_state = distributed.select_data_state(saved_data, shard_index, shard_count)
      logging.info('Resumed from the checkpoint of step %d in %s.', restored_step, mgr.directory)
    step = int(jax.device_get(state['step']))
    if is_main:
      workdir_lib.truncate_metrics(workdir, step)
    train_step = compile_train_step(config, layout, tx, shardings, state)
    eval_step = make_eval_step(layout, shardings['params'])
    writer = metrics_lib.MetricWriter(
      workdir, enabled=is_main, tensorboard=config.train.tensorboard
    )
    stack.callback(writer.close)
    signals = stack.enter_context(_StopSignals())
    bar = stack.enter_context(logs_lib.progress(config.train.steps, step, enabled=is_main))

    def save(state, data_state) -> int:
      data = distributed.gather_data_state(data_state, shard_index, shard_count)
      return checkpoint_lib.save(mgr, state, data)

    return _loop(
      config, strategy, state, source, data_state, train_step, eval_step, writer, signals, bar,
      save, lambda: checkpoint_lib.wait(mgr), batch_sharding, global_shape,
      last_saved=None if restored is None else restored[2],
      rebalancer=rebalance.Rebalancer(layout, shardings),
    )  # fmt: skip


def _loop(
  config, strategy, state, source, data_state, train_step, eval_step, writer, signals, bar,
  save, wait, batch_sharding, global_shape, last_saved, rebalancer,
) -> dict[str, float]:  # fmt: skip
  """The training loop proper (see train_and_evaluate)."""
  tokens_per_step = config.data.batch_size * config.data.seq_len
  flops_per_step = metrics_lib.train_flops_per_token(config.model, config.data.seq_len) * (
    tokens_per_step
  )
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
  skip_limit = config.train.skip_nonfinite_steps
  step = int(jax.device_get(state['step']))
  batches = source.train_batches(data_state)
  last: dict[str, float] = {}
  window_start, window_steps = None, 0
  replacements: dict[str, float] = {}  # of the last expert re-placement, until logged
  pending = None  # (step, metrics) of a step whose loss is not yet checked for NaN/inf
  while step < config.train.steps and not signals.stop_requested():
    batch, data_state = next(batches)
    state, metrics = train_step(state, distributed.to_global(batch, batch_sharding, global_shape))
    step += 1
    window_steps += 1
    if pending is not None:  # checks step - 1 while step runs: one step stays in flight
      _check_finite(*pending, skip_limit, last_saved)
    pending = (step, metrics)
    if window_start is None:  # the first step compiles; time from its end
      jax.block_until_ready(state['step'])
      window_start, window_steps = time.perf_counter(), 0
    state, placed = rebalancer.maybe_rebalance(step, state)  # parallel.rebalance_every
    replacements.update(placed)
    done = step == config.train.steps
    log_now = step % config.train.log_every == 0 or done
    eval_now = step % config.train.eval_every == 0 or done
    save_now = step % config.train.checkpoint_every == 0 or done
    if log_now or eval_now:
      last = {**_scalars(metrics), **replacements}
      replacements = {}
      jax.block_until_ready(state['step'])
      if window_steps:
        step_time = (time.perf_counter() - window_start) / window_steps
        last['step_time_s'] = step_time
        last['tokens_per_sec'] = tokens_per_step / step_time
        last['mfu'] = flops_per_step / step_time / (peak * len(strategy.devices)) if peak else None
      logging.info(
        'step %d/%d  loss %.4f  aux %.4f  dropped %.3f  grad_norm %.3f  %s tok/s',
        step,
        config.train.steps,
        last['loss'],
        last['aux_loss'],
        last['dropped_token_fraction'],
        last['grad_norm'],
        f'{last["tokens_per_sec"]:.0f}' if 'tokens_per_sec' in last else '-',
      )
      bar.set_postfix(loss=f'{last["loss"]:.4f}', refresh=False)
      if eval_now:
        last.update(
          evaluate(
            eval_step,
            state['params'],
            source,
            config.train.eval_steps,
            batch_sharding,
            global_shape,
            state.get('placement'),
          )
        )
        logging.info('step %d  eval_loss %.4f', step, last['eval_loss'])
      writer.write(step, last)
    bar.update(1)
    if save_now:
      _check_finite(*pending, skip_limit, last_saved)
      pending = None
      last_saved = save(state, data_state)
    if log_now or eval_now:
      window_start, window_steps = time.perf_counter(), 0
  if pending is not None:
    _check_finite(*pending, skip_limit, last_saved)
  if step < config.train.steps:  # stopped by a signal
    if last_saved != step:
      last_saved = save(state, data_state)
    wait()
    logging.warning(
      'Stopped by %s at step %d of %d; saved the checkpoint of step %d. Run the same command '
      'to resume.',
      signals.received or 'a signal to another process',
      step,
      config.train.steps,
      last_saved,
    )
    return last
  wait()
  return last
