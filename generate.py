"""Generates text from a train.py run: `python generate.py --workdir=DIR --prompt="..."`.

This file is intentionally short: flags, and a call into `mas_jax.generate_lib`. The model comes
from the latest checkpoint of --workdir and its config.json; every field of that config is a
flag that applies to generation only, e.g. `--config.parallel.strategy=dp`. Greedy by default;
--temperature > 0 samples (with --top_k / --top_p).
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mas_jax import generate_lib
from mas_jax.config import ConfigError
from mas_jax.workdir import RunError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Workdir of a train.py run (config.json + checkpoints).')
flags.DEFINE_multi_string('prompt', [], 'A prompt (text); may be given several times.')
flags.DEFINE_string('prompts_file', None, 'A text file of prompts, one a line.')
flags.DEFINE_integer('max_new_tokens', 32, 'Tokens to generate per prompt at most.')
flags.DEFINE_float('temperature', 0.0, '0: greedy; > 0: sample from softmax(logits / T).')
flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens only (0: all).')
flags.DEFINE_float('top_p', 1.0, 'Sample from the top-p nucleus only (1: all).')
flags.DEFINE_integer('seed', 0, 'Seed of sampling.')
flags.DEFINE_integer('context', None, "KV cache positions (default: the run's data.seq_len).")
flags.DEFINE_string('output', None, 'A JSONL file: one object per prompt, written atomically.')
flags.mark_flag_as_required('workdir')


def parse_flags(argv: list[str]) -> list[str]:
  """Reads --workdir, then defines --config from its config.json, so --config.x.y=v overrides it.

  The overrides are typed by the config's own fields (ml_collections config_flags).
  """
  try:
    FLAGS(argv, known_only=True)  # --config.* is not defined before the workdir is known
    run_config = generate_lib.load_run_config(FLAGS.workdir)
    config_flags.DEFINE_config_dict(
      'config', run_config, "The run's config.json (overrides apply to generation)."
    )
    FLAGS.unparse_flags()  # parse again from scratch: --prompt values must not repeat
    return FLAGS(argv)
  except ConfigError as e:
    sys.exit(f'ConfigError: {e}')
  except flags.Error as e:
    sys.exit(f'FATAL Flags parsing error: {e}')
  except AttributeError as e:  # ml_collections: a --config.x.y the config does not have
    field = str(e.args[0] if e.args else e).strip('\'"')
    sys.exit(f"FATAL Flags parsing error: the run's config.json has no field {field!r}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.info('JAX %s, %d devices: %s', jax.__version__, jax.device_count(), jax.devices()[0])
  try:  # bad input: one line, no traceback (raised before any work)
    out = generate_lib.generate(
      FLAGS.config,
      FLAGS.workdir,
      generate_lib.read_prompts(FLAGS.prompt, FLAGS.prompts_file),
      max_new_tokens=FLAGS.max_new_tokens,
      temperature=FLAGS.temperature,
      top_k=FLAGS.top_k,
      top_p=FLAGS.top_p,
      seed=FLAGS.seed,
      context=FLAGS.context,
      output=FLAGS.output,
    )
  except (ConfigError, RunError) as e:  # a damaged checkpoint too (CheckpointError)
    sys.exit(f'{type(e).__name__}: {e}')
  print(generate_lib.report(out))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
