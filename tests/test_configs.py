"""Every config file loads and validates; every validation error names its numbers."""

import importlib
import pathlib

import pytest
from conftest import tiny_config

from mas_jax import config as config_lib
from mas_jax import strategies

CONFIG_FILES = sorted(p.stem for p in pathlib.Path('configs').glob('*.py') if p.stem != '__init__')


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_config_file_validates(name):
  cd = importlib.import_module(f'configs.{name}').get_config()
  config = config_lib.from_config_dict(cd)
  assert config.model.d_model % config.model.num_heads == 0


def test_paper_config_is_the_seed_model():
  m = config_lib.from_config_dict(importlib.import_module('configs.paper').get_config())
  assert (m.model.num_layers, m.model.d_model, m.model.num_heads, m.model.head_dim) == (
    4,
    4096,
    32,
    128,
  )
  assert (m.model.num_experts, m.model.top_k, m.model.expert_hidden) == (16, 2, 16384)
  assert (m.data.seq_len, m.data.batch_size, m.train.steps) == (2048, 1024, 50_000)
  assert (m.parallel.strategy, m.parallel.attn_devices, m.parallel.moe_devices) == ('ma_sep', 12, 4)


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'model.num_heads': 6}, 'model.num_heads=6 does not divide model.d_model=64'),
    ({'model.top_k': 17}, 'model.top_k=17 exceeds model.num_experts=16'),
    ({'model.activation': 'swish'}, "model.activation='swish' is not one of"),
    ({'model.compute_dtype': 'int8'}, "model.compute_dtype='int8' is not one of"),
    ({'model.attention_impl': 'flash'}, "model.attention_impl='flash' is not one of"),
    ({'model.remat': 'some'}, "model.remat='some' is not one of"),
    ({'model.expert_dropout': 1.0}, 'model.expert_dropout=1.0 must be in [0, 1)'),
    ({'model.capacity_factor': 0.0}, 'model.capacity_factor=0.0 must be positive'),
    ({'model.d_model': 0}, 'model.d_model=0 must be positive'),
    ({'model.d_model': 24, 'model.num_heads': 8}, 'head_dim=3'),
    ({'model.aux_loss_coef': -1.0}, 'aux_loss_coef=-1.0'),
    ({'data.source': 'lm1b'}, "data.source='lm1b' is not one of"),
    ({'data.seq_len': 0}, 'data.seq_len=0 must be positive'),
    ({'data.batch_size': 0}, 'data.batch_size=0 must be positive'),
    ({'data.shuffle_buffer': 0}, 'data.shuffle_buffer=0'),
    ({'train.steps': 0}, 'train.steps=0 must be positive'),
    ({'train.learning_rate': 0.0}, 'train.learning_rate=0.0 must be positive'),
    ({'train.warmup_steps': -1}, 'train.warmup_steps=-1'),
    ({'train.end_lr_ratio': 2.0}, 'train.end_lr_ratio=2.0'),
    ({'train.b2': 1.0}, 'train.b2=1.0'),
    ({'train.grad_clip': 0.0}, 'train.grad_clip=0.0'),
    ({'train.log_every': 0}, 'train.log_every=0 must be positive'),
    ({'parallel.moe_dispatch': 'ring'}, "parallel.moe_dispatch='ring' is not one of"),
    ({'train.grad_accum_steps': 0}, 'train.grad_accum_steps=0 must be positive'),
    (
      {'train.grad_accum_steps': 3},
      'train.grad_accum_steps=3 x parallel.num_microbatches=1 does not divide data.batch_size=16',
    ),
    (
      {'train.fuse_grad_accum': True, 'parallel.strategy': 'dp'},
      'train.fuse_grad_accum needs train.grad_accum_steps > 1, model.num_layers=1, '
      'parallel.strategy=reference, einsum experts, no parallel.shard_optimizer or '
      "grad_compression; got grad_accum_steps=1, num_layers=2, strategy='dp'",
    ),
    ({'parallel.num_microbatches': 0}, 'parallel.num_microbatches=0 must be positive'),
    (
      {'parallel.num_microbatches': 3},
      'parallel.num_microbatches=3 does not divide data.batch_size=16',
    ),
  ],
)
def test_validation_errors(overrides, message):
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.from_config_dict(tiny_config(**overrides))
  assert message in str(err.value)
  assert '\n' not in str(err.value)


def test_unknown_strategy_and_bad_dp_batch():
  with pytest.raises(config_lib.ConfigError, match=r"parallel.strategy='zz' is not one of"):
    strategies.get(config_lib.from_config_dict(tiny_config(**{'parallel.strategy': 'zz'})))
  config = config_lib.from_config_dict(
    tiny_config(**{'parallel.strategy': 'dp', 'data.batch_size': 8})
  )
  with pytest.raises(
    config_lib.ConfigError, match='data.batch_size=8 does not divide over devices=16'
  ):
    strategies.get(config)
