"""Trains a mas-jax MoE transformer: `python train.py --config=configs/tiny.py --workdir=DIR`.

This file is intentionally short: flags, logging and a call into `mas_jax.train_lib`. Every field
of the config file is a flag, e.g. `--config.train.steps=20 --config.parallel.strategy=dp`; the
number of CPU devices comes from XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # tf.data only reads files here

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mas_jax import train_lib
from mas_jax.config import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string(
  'workdir',
  '/tmp/mas_jax/tiny',
  'Checkpoints, metrics.jsonl, TensorBoard and config.json; resumed if present.',
)
config_flags.DEFINE_config_file(
  'config', 'configs/tiny.py', 'Config file (ml_collections).', lock_config=True
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.info(
    'JAX %s, process %d of %d, %d devices: %s',
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  logging.info('Config:\n%s', FLAGS.config)
  try:
    train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:  # bad input: one line, no traceback (raised before any work)
    sys.exit(f'ConfigError: {e}')


if __name__ == '__main__':
  app.run(main)
