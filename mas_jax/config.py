"""ConfigDict -> frozen dataclasses, with every check of a bad combination in one place.

Flax modules and strategies never see a ConfigDict: `from_config_dict` converts it at the boundary
and `validate` raises one `ConfigError` naming the numbers involved before anything is compiled.
Checks that need the device count (strategy shapes) live with each strategy, which calls
`ConfigError` the same way.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mas_jax.layers import grouped_matmul as gmm_lib
from mas_jax.layers import moe as moe_lib

_DTYPES = ('float32', 'bfloat16', 'float16')
_ACTIVATIONS = ('gelu', 'relu')
_SOURCES = ('c4', 'synthetic')
_ATTENTION_IMPLS = ('auto', 'cudnn', 'xla')
_REMAT = ('none', 'full', 'save_dots')
_DISPATCH = ('auto', 'all_to_all', 'replicated')
# AdamW's first moment (train.mu_dtype); optax keeps the second in the parameters' float32.
MU_DTYPES = {'float32': 4, 'bfloat16': 2}
# tp_pp's pipeline schedule: GPipe (all M micro-batches live per stage) or 1F1B (at most pp).
PP_SCHEDULES = ('gpipe', '1f1b')
COMPRESSIONS = ('none', 'topk')  # mas_jax/compression.py
ATTN_SHARDINGS = ('heads', 'batch')  # ma_sep: head slots per attention device, or sequences


class ConfigError(ValueError):
  """A configuration value, or a combination of values, that cannot run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of the MoE transformer (see configs/tiny.py for each field's meaning)."""

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_experts: int
  top_k: int
  expert_hidden: int
  activation: str = 'gelu'
  expert_dropout: float = 0.0
  capacity_factor: float = 1.25
  dropless: bool = False
  aux_loss_coef: float = 1e-2
  z_loss_coef: float = 1e-3
  compute_dtype: str = 'float32'
  rope_base: float = 10000.0
  attention_impl: str = 'auto'
  expert_impl: str = 'auto'
  remat: str = 'none'
  loss_chunk: int = 0  # tokens per chunk of the output head + cross entropy; 0: unchunked

  @property
  def attention_implementation(self) -> str | None:
    """The `implementation` argument of jax.nn.dot_product_attention."""
    return None if self.attention_impl == 'auto' else self.attention_impl

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str
  dataset: str
  version: str
  data_dir: str
  tokenizer_path: str
  seq_len: int
  batch_size: int
  shuffle_buffer: int
  prefetch: int
  train_split: str
  eval_split: str


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int
  learning_rate: float
  warmup_steps: int
  end_lr_ratio: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip: float
  log_every: int
  eval_every: int
  eval_steps: int
  checkpoint_every: int
  keep_checkpoints: int
  grad_accum_steps: int = 1
  skip_nonfinite_steps: int = 0
  tensorboard: bool = True
  mu_dtype: str = 'float32'  # AdamW's first moment: MU_DTYPES (the second stays float32)
  # One device with grad_accum_steps > 1, one layer, 'reference', einsum experts: each expert
  # weight-gradient GEMM adds into the float32 accumulator itself (beta = 1) instead of writing
  # bf16 gradients that a separate pass adds (train_lib.accumulate; bench/grad_accum_fusion.py).
  # Not bit-equal: the expert weights' gradients are summed unrounded.
  fuse_grad_accum: bool = False

  @property
  def state_bytes_per_param(self) -> int:
    """Train-state bytes held per parameter: the float32 master weight, AdamW's first moment
    in mu_dtype and its float32 second moment (12, or 10 with bfloat16 moments)."""
    return 4 + MU_DTYPES.get(self.mu_dtype, 4) + 4


# parallel fields that may be 'auto' (ma_sep only): train.py asks the planner for them
# (mas_jax.train_lib.resolve_auto_placement) before the strategy is built.
AUTO = 'auto'
AUTO_FIELDS = ('attn_devices', 'moe_devices', 'num_microbatches')


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  strategy: str
  attn_devices: int | str  # int, or AUTO until resolved
  moe_devices: int | str
  num_microbatches: int | str
  hierarchical_allreduce: bool
  tp: int
  pp: int
  ep: int
  moe_dispatch: str = 'auto'
  hardware: str = 'auto'  # what the planner models for AUTO fields (see configs/tiny.py)
  shard_optimizer: bool = False  # ZeRO: master weights and AdamW moments over all devices
  shard_gradients: bool = True  # with shard_optimizer: gradients per chunk (ZeRO-2) or per step
  pp_schedule: str = 'gpipe'  # tp_pp's pipeline schedule: PP_SCHEDULES
  grad_compression: str = 'none'  # replicated parameters' gradient all-reduce: COMPRESSIONS
  topk_fraction: float = 0.01  # with grad_compression='topk': share of entries each device sends
  attn_sharding: str = 'heads'  # ma_sep's attention group: ATTN_SHARDINGS (see configs/tiny.py)
  rebalance_every: int = 0  # ma_sep: steps between expert re-placements (0: never)

  @property
  def auto_fields(self) -> list[str]:
    """The AUTO_FIELDS set to 'auto' (resolved by the planner before the strategy is built)."""
    return [f for f in AUTO_FIELDS if getattr(self, f) == AUTO]


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  parallel: ParallelConfig


def from_config_dict(cd: ml_collections.ConfigDict) -> Config:
  """Converts a ConfigDict (as loaded by config_flags) to a validated frozen `Config`."""
  sections = {
    'model': ModelConfig,
    'data': DataConfig,
    'train': TrainConfig,
    'parallel': ParallelConfig,
  }
  kwargs = {}
  for name, cls in sections.items():
    given = dict(cd[name])
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(given) - known):
      raise ConfigError(f'config.{name} has unknown fields {unknown}; known: {sorted(known)}')
    kwargs[name] = cls(**given)
  config = Config(seed=int(cd.seed), **kwargs)
  validate(config)
  return config


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(config: Config) -> None:
  """Raises ConfigError for the first bad value or combination, naming the numbers involved."""
  m, d, t, p = config.model, config.data, config.train, config.parallel
  for name in (
    'vocab_size',
    'num_layers',
    'd_model',
    'num_heads',
    'num_experts',
    'top_k',
    'expert_hidden',
  ):
    _check(getattr(m, name) > 0, f'model.{name}={getattr(m, name)} must be positive')
  _check(
    m.attention_impl in _ATTENTION_IMPLS,
    f'model.attention_impl={m.attention_impl!r} is not one of {_ATTENTION_IMPLS}',
  )
  _check(m.remat in _REMAT, f'model.remat={m.remat!r} is not one of {_REMAT}')
  _check(
    isinstance(m.loss_chunk, int) and m.loss_chunk >= 0,
    f'model.loss_chunk={m.loss_chunk!r} must be an integer >= 0 (tokens per chunk; 0: off)',
  )
  _check(
    m.expert_impl in moe_lib.EXPERT_IMPLS,
    f'model.expert_impl={m.expert_impl!r} is not one of {moe_lib.EXPERT_IMPLS}',
  )
  if m.expert_impl not in ('auto', 'einsum'):
    _check(
      p.strategy in ('reference', 'dp'),
      f'model.expert_impl={m.expert_impl!r} runs where one device holds all experts; '
      f'parallel.strategy={p.strategy!r} runs them on capacity buffers (use einsum or auto)',
    )
    _check(
      m.expert_dropout == 0,
      f'model.expert_dropout={m.expert_dropout} needs model.expert_impl einsum, '
      f'not {m.expert_impl!r}',
    )
  if m.expert_impl == 'mosaic_gpu':
    for k, n in ((m.d_model, m.expert_hidden), (m.expert_hidden, m.d_model)):
      for rows in (None, 0):  # both kernels: training's two-warpgroup one, decode's
        two = gmm_lib.two_warpgroup(rows)
        try:
          gmm_lib.check_shapes(0, k, n, *gmm_lib.tilings_for(k, n, rows), two_warpgroups=two)
        except ValueError as e:
          raise ConfigError(f'model.expert_impl=mosaic_gpu: {e}') from None
  _check(
    m.d_model % m.num_heads == 0,
    f'model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}',
  )
  _check(m.head_dim % 2 == 0, f'head_dim={m.head_dim} (d_model/num_heads) must be even for RoPE')
  _check(
    m.top_k <= m.num_experts, f'model.top_k={m.top_k} exceeds model.num_experts={m.num_experts}'
  )
  _check(
    m.activation in _ACTIVATIONS, f'model.activation={m.activation!r} is not one of {_ACTIVATIONS}'
  )
  _check(
    m.compute_dtype in _DTYPES, f'model.compute_dtype={m.compute_dtype!r} is not one of {_DTYPES}'
  )
  _check(
    0.0 <= m.expert_dropout < 1.0, f'model.expert_dropout={m.expert_dropout} must be in [0, 1)'
  )
  _check(
    m.dropless or m.capacity_factor > 0,
    f'model.capacity_factor={m.capacity_factor} must be positive (or set model.dropless)',
  )
  _check(
    m.aux_loss_coef >= 0 and m.z_loss_coef >= 0,
    f'aux_loss_coef={m.aux_loss_coef} and z_loss_coef={m.z_loss_coef} must be >= 0',
  )

  _check(d.source in _SOURCES, f'data.source={d.source!r} is not one of {_SOURCES}')
  _check(d.seq_len > 0, f'data.seq_len={d.seq_len} must be positive')
  _check(d.batch_size > 0, f'data.batch_size={d.batch_size} must be positive')
  _check(
    d.shuffle_buffer > 0 and d.prefetch >= 0,
    f'data.shuffle_buffer={d.shuffle_buffer} must be > 0, data.prefetch={d.prefetch} >= 0',
  )

  _check(t.steps > 0, f'train.steps={t.steps} must be positive')
  _check(t.learning_rate > 0, f'train.learning_rate={t.learning_rate} must be positive')
  _check(t.warmup_steps >= 0, f'train.warmup_steps={t.warmup_steps} must be >= 0')
  _check(0 <= t.end_lr_ratio <= 1, f'train.end_lr_ratio={t.end_lr_ratio} must be in [0, 1]')
  _check(0 <= t.b1 < 1 and 0 <= t.b2 < 1, f'train.b1={t.b1}, train.b2={t.b2} must be in [0, 1)')
  _check(t.grad_clip > 0, f'train.grad_clip={t.grad_clip} must be positive')
  _check(
    t.mu_dtype in MU_DTYPES,
    f'train.mu_dtype={t.mu_dtype!r} is not one of {tuple(MU_DTYPES)}',
  )
  for name in ('log_every', 'eval_every', 'eval_steps', 'checkpoint_every', 'keep_checkpoints'):
    _check(getattr(t, name) > 0, f'train.{name}={getattr(t, name)} must be positive')

  _check(
    t.skip_nonfinite_steps >= 0,
    f'train.skip_nonfinite_steps={t.skip_nonfinite_steps} must be >= 0',
  )
  _check(t.grad_accum_steps > 0, f'train.grad_accum_steps={t.grad_accum_steps} must be positive')
  if t.fuse_grad_accum:
    einsum = m.expert_impl == 'einsum' or (
      m.expert_impl == 'auto' and (not m.dropless or m.expert_dropout > 0)
    )
    # At more than one layer the layer scan hands each layer a slice of the accumulator and XLA
    # adds the float32 gradient in a separate pass again, plus a copy (bench/grad_accum_fusion.py).
    _check(
      t.grad_accum_steps > 1
      and m.num_layers == 1
      and p.strategy == 'reference'
      and einsum
      and not p.shard_optimizer
      and p.grad_compression == 'none',
      f'train.fuse_grad_accum needs train.grad_accum_steps > 1, model.num_layers=1, '
      f'parallel.strategy=reference, einsum experts, no parallel.shard_optimizer or '
      f'grad_compression; got grad_accum_steps={t.grad_accum_steps}, '
      f'num_layers={m.num_layers}, strategy={p.strategy!r}, '
      f'model.expert_impl={m.expert_impl!r} (dropless={m.dropless}, '
      f'expert_dropout={m.expert_dropout}), shard_optimizer={p.shard_optimizer}, '
      f'grad_compression={p.grad_compression!r}',
    )
  _check(
    p.moe_dispatch in _DISPATCH,
    f'parallel.moe_dispatch={p.moe_dispatch!r} is not one of {_DISPATCH}',
  )
  _check(
    p.pp_schedule in PP_SCHEDULES,
    f'parallel.pp_schedule={p.pp_schedule!r} is not one of {PP_SCHEDULES}',
  )
  _check(
    p.grad_compression in COMPRESSIONS,
    f'parallel.grad_compression={p.grad_compression!r} is not one of {COMPRESSIONS}',
  )
  _check(
    p.attn_sharding in ATTN_SHARDINGS,
    f'parallel.attn_sharding={p.attn_sharding!r} is not one of {ATTN_SHARDINGS}',
  )
  _check(
    not (p.attn_sharding == 'batch' and p.hierarchical_allreduce),
    'parallel.hierarchical_allreduce reduces head partial sums: with parallel.attn_sharding='
    "'batch' the attention output is gathered, not summed (set one of them back)",
  )
  _check(
    isinstance(p.rebalance_every, int) and p.rebalance_every >= 0,
    f'parallel.rebalance_every={p.rebalance_every!r} must be an integer >= 0 (0: never)',
  )
  _check(
    p.rebalance_every == 0 or p.strategy == 'ma_sep',
    f'parallel.rebalance_every={p.rebalance_every} re-places the experts of '
    f"parallel.strategy='ma_sep'; parallel.strategy={p.strategy!r} has no expert slots to move",
  )
  _check(0 < p.topk_fraction <= 1, f'parallel.topk_fraction={p.topk_fraction} must be in (0, 1]')
  if p.grad_compression == 'topk':
    _check(
      p.strategy in ('dp', 'ep', 'ma_sep'),
      "parallel.grad_compression='topk' compresses the data-parallel all-reduce of the "
      f'parameters every device holds whole: parallel.strategy={p.strategy!r} has none '
      '(dp, ep and ma_sep have one)',
    )
  _check_auto_fields(p)
  if p.num_microbatches == AUTO:
    return  # the divisibility checks below run again once the planner has chosen M
  _check(p.num_microbatches > 0, f'parallel.num_microbatches={p.num_microbatches} must be positive')
  _check(
    d.batch_size % p.num_microbatches == 0,
    f'parallel.num_microbatches={p.num_microbatches} does not divide '
    f'data.batch_size={d.batch_size}',
  )
  _check(
    d.batch_size % (t.grad_accum_steps * p.num_microbatches) == 0,
    f'train.grad_accum_steps={t.grad_accum_steps} x parallel.num_microbatches='
    f'{p.num_microbatches} does not divide data.batch_size={d.batch_size}',
  )


def _check_auto_fields(p: ParallelConfig) -> None:
  """attn_devices, moe_devices and num_microbatches: an integer, or 'auto' under ma_sep."""
  for name in AUTO_FIELDS:
    value = getattr(p, name)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    _check(
      is_int or value == AUTO, f"parallel.{name}={value!r} must be a positive integer or 'auto'"
    )
  auto = p.auto_fields
  if not auto:
    return
  _check(
    p.strategy == 'ma_sep',
    f"parallel.{auto[0]}='auto' is chosen by the planner for parallel.strategy='ma_sep' only, "
    f'not {p.strategy!r}: give it a number',
  )
  for name in AUTO_FIELDS:
    value = getattr(p, name)
    _check(
      value == AUTO or value > 0, f"parallel.{name}={value} must be a positive integer or 'auto'"
    )
  _check(
    isinstance(p.hardware, str) and bool(p.hardware),
    f"parallel.hardware={p.hardware!r} must be 'auto', a preset name or a JSON file",
  )
