"""Trains a mas-jax MoE transformer: `python train.py --config=configs/tiny.py --workdir=DIR`.

This file is intentionally short: flags, logging and a call into `mas_jax.train_lib`. Every field
of the config file is a flag, e.g. `--config.train.steps=20 --config.parallel.strategy=dp`; the
number of CPU devices comes from XLA_FLAGS=--xla_force_host_platform_device_count=N.

Exit codes: 0 when the run finished or stopped cleanly on SIGTERM/SIGINT (after saving), 1 with
one line on stderr for bad input (a config error, a changed config on resume, a locked workdir,
a bad flag) and for a failed run (a non-finite loss, no good checkpoint, a failed save).
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # tf.data only reads files here
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # and needs no oneDNN (nor its banner)

from absl import app, flags, logging
from ml_collections import config_flags

from mas_jax import distributed, train_lib
from mas_jax import logs as logs_lib
from mas_jax.config import ConfigError
from mas_jax.workdir import RunError

FLAGS = flags.FLAGS
flags.DEFINE_string(
  'workdir',
  '/tmp/mas_jax/tiny',
  'Checkpoints, metrics.jsonl, TensorBoard and config.json; resumed if present.',
)
if __name__ == '__main__' and (error := logs_lib.unknown_config_override(sys.argv)):
  sys.exit(f'FATAL Flags parsing error: {error}')  # config_flags would raise a traceback
config_flags.DEFINE_config_file(
  'config', 'configs/tiny.py', 'Config file (ml_collections).', lock_config=True
)
flags.DEFINE_list(
  'resume_changed',
  [],
  'Config fields (e.g. train.learning_rate,seed) allowed to differ from the run being resumed; '
  'any other difference stops the run. Accepted changes are kept in config_history.jsonl.',
)
flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0 for a multi-process run (jax.distributed); or JAX_COORDINATOR_ADDRESS.',
)
flags.DEFINE_integer(
  'num_processes', None, 'Processes of a multi-process run; or JAX_NUM_PROCESSES.'
)
flags.DEFINE_integer('process_id', None, 'This process in 0..num_processes-1; or JAX_PROCESS_ID.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    logs_lib.quiet_libraries(FLAGS.verbosity)
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir, resume_changed=FLAGS.resume_changed)
  except (ConfigError, RunError) as e:  # bad input or a failed run: one line, no traceback
    logging.flush()
    sys.exit(f'{type(e).__name__}: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=logs_lib.parse_flags_one_line)
