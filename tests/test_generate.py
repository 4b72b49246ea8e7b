"""generate.py and mas_jax/generate_lib.py on a 3-step train.py run of the tiny config."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

from mas_jax import checkpoint as checkpoint_lib
from mas_jax import config as config_lib
from mas_jax import generate_lib, strategies, train_lib
from mas_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Three lengths (15, 7 and 1 tokens with the sample's tokenizer), the longest first.
PROMPTS = [
  'If the argument is omitted, the default value is used.',
  'Return the number of items',
  'The',
]
NEW = 6  # max_new_tokens; the run's data.seq_len = 32 is the default context
FIELDS = {'prompt', 'prompt_tokens', 'tokens', 'text', 'stopped_at_eos'}


@pytest.fixture(scope='module')
def run_dir(sample_dir, tmp_path_factory) -> str:
  """A train.py workdir: 3 steps of the tiny config on the embedded sample, one checkpoint."""
  workdir = str(tmp_path_factory.mktemp('generate_run'))
  overrides = {
    'data.data_dir': sample_dir,
    'data.seq_len': 32,
    'data.batch_size': 4,
    'data.prefetch': 0,
    'train.steps': 3,
    'train.log_every': 3,
    'train.eval_every': 3,
    'train.eval_steps': 1,
    'train.checkpoint_every': 3,
  }
  train_lib.train_and_evaluate(tiny_config(**overrides), workdir)
  return workdir


@pytest.fixture(scope='module')
def reference(run_dir, tmp_path_factory):
  """Greedy completions of PROMPTS under the run's own strategy (reference), with --output."""
  output = str(tmp_path_factory.mktemp('reference') / 'out.jsonl')
  cd = generate_lib.load_run_config(run_dir)
  return generate_lib.generate(cd, run_dir, PROMPTS, max_new_tokens=NEW, output=output), output


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_restore_params_equals_the_checkpoint(run_dir):
  params, step = generate_lib.restore_params(run_dir)
  with ocp.CheckpointManager(os.path.join(run_dir, 'checkpoints')) as mgr:
    state = mgr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  assert step == 3
  for a, b in zip(_leaves(params), _leaves(state['params']), strict=True):
    np.testing.assert_array_equal(a, b)


def test_restore_params_refuses_params_that_fail_their_checksum(run_dir, tmp_path):
  workdir = tmp_path / 'damaged'
  shutil.copytree(run_dir, workdir)
  record = workdir / 'checkpoints/3/integrity/metadata'
  integrity = json.loads(record.read_text())
  name = min(k for k in integrity['arrays'] if k.startswith("['params']"))
  integrity['arrays'][name] = '0' * 16  # what a flipped byte in that array looks like
  record.write_text(json.dumps(integrity))
  with pytest.raises(checkpoint_lib.CheckpointError, match=r'checksum mismatch in 1 array'):
    generate_lib.restore_params(str(workdir))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_restore_converts_the_training_layout(run_dir, tmp_path):
  """A checkpoint in ma_sep's head and expert slots restores to the reference layout."""
  params, _ = generate_lib.restore_params(run_dir)
  workdir = _workdir_with(run_dir, tmp_path, checkpoints=False, **{'parallel.strategy': 'ma_sep'})
  config = config_lib.from_config_dict(generate_lib.load_run_config(workdir))
  slotted = jax.jit(strategies.get(config).from_reference)(params)  # 12:4 on the 16 devices
  assert slotted['blocks']['moe']['w_in'].shape != params['blocks']['moe']['w_in'].shape
  tx = train_lib.make_optimizer(config.train)
  state = {'step': jnp.asarray(3, jnp.int32), 'params': slotted, 'opt_state': tx.init(slotted)}
  mgr = checkpoint_lib.manager(os.path.join(workdir, 'checkpoints'), keep=1)
  checkpoint_lib.save(mgr, state, {'shard_count': 1, 'shards': [{'docs': 0, 'leftover': []}]})
  checkpoint_lib.wait(mgr)
  mgr.close()
  restored, step = generate_lib.restore_params(workdir)
  assert step == 3
  for a, b in zip(_leaves(restored), _leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_reference_and_dp_generate_the_same_tokens(run_dir, reference, tmp_path):
  ref, ref_output = reference
  cd = generate_lib.load_run_config(run_dir)
  cd.parallel.strategy = 'dp'  # what --config.parallel.strategy=dp does
  output = str(tmp_path / 'dp.jsonl')
  devices = jax.devices()[:4]  # a smaller compile than all 16; still pads the batch
  dp = generate_lib.generate(
    cd, run_dir, PROMPTS, max_new_tokens=NEW, output=output, devices=devices
  )
  assert (ref.strategy, ref.result.batch) == ('reference', 3)
  assert (dp.strategy, dp.result.batch) == ('dp', 4)  # one padding row for 4 devices
  assert [len(c.prompt_tokens) for c in ref.completions] == [15, 7, 1]
  assert [c.tokens for c in dp.completions] == [c.tokens for c in ref.completions]
  for c in ref.completions:
    assert len(c.tokens) == NEW or c.stopped_at_eos
  assert ref.result.prefill_s > 0 and ref.result.tpot_s > 0 and ref.result.tokens_per_s > 0
  assert _read_jsonl(output) == _read_jsonl(ref_output)


def test_output_jsonl_fields_and_text(run_dir, reference):
  ref, output = reference
  records = _read_jsonl(output)
  tokenizer = generate_lib.load_tokenizer(ref_config(run_dir).data, 512)
  assert [r['prompt'] for r in records] == PROMPTS
  for record, c in zip(records, ref.completions, strict=True):
    assert set(record) == FIELDS
    assert record['prompt_tokens'] == tokenizer.encode(record['prompt'])
    assert record['tokens'] == c.tokens and record['stopped_at_eos'] == c.stopped_at_eos
    assert record['text'] == c.text
    whole = tokenizer.decode(record['prompt_tokens'] + record['tokens'])
    assert whole == tokenizer.decode(record['prompt_tokens']) + record['text']
    assert all(0 <= t < 512 for t in record['tokens'])
  assert os.listdir(os.path.dirname(output)) == ['out.jsonl']  # no temporary left behind
  report = generate_lib.report(ref).splitlines()
  assert report[0] == f'[prompt 0, 15 tokens] {PROMPTS[0]}'
  assert report[-4].startswith('strategy: reference, batch 3 ')
  assert [line.split(':')[0] for line in report[-3:]] == ['prefill', 'TPOT', 'tokens/s']


def ref_config(run_dir):
  return config_lib.from_config_dict(generate_lib.load_run_config(run_dir))


def _workdir_with(run_dir, tmp_path, checkpoints=True, **config_changes) -> str:
  """A workdir sharing run_dir's checkpoints, its config.json changed by {'section.field': v}."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  if checkpoints:
    os.symlink(os.path.join(run_dir, 'checkpoints'), workdir / 'checkpoints')
  with open(os.path.join(run_dir, 'config.json')) as f:
    config = json.load(f)
  for dotted, value in config_changes.items():
    section, field = dotted.split('.')
    config[section][field] = value
  (workdir / 'config.json').write_text(json.dumps(config))
  return str(workdir)


def _sample_tokenizer(run_dir) -> str:
  data = ref_config(run_dir).data
  return generate_lib.tokenizer_path(data, 512)


# (id, workdir change, generate() arguments, the error's regex)
BAD = [
  ('no_checkpoint', {'checkpoints': False}, {}, r'has no checkpoint in .*checkpoints$'),
  ('no_config', 'empty', {}, r'has no config\.json'),
  (
    'more_pieces',
    {'model.vocab_size': 256, 'data.tokenizer_path': 'SAMPLE'},
    {},
    r'has 512 pieces, more than the checkpoint\'s model\.vocab_size=256$',
  ),
  (
    'fewer_pieces',
    {'model.vocab_size': 1024, 'data.tokenizer_path': 'SAMPLE'},
    {},
    r'has 512 pieces, fewer than the checkpoint\'s model\.vocab_size=1024$',
  ),
  (
    'prompt_too_long',
    None,
    {'context': 8, 'max_new_tokens': 1},
    r'^prompt 0 has 15 tokens, longer than the cache context=8$',
  ),
  (
    'overflow',
    None,
    {'max_new_tokens': 18},
    r'^prompt 0 \(15 tokens\) \+ max_new_tokens=18 = 33 overflows the cache context=32$',
  ),
  ('negative_temperature', None, {'temperature': -0.5}, r'^temperature=-0\.5 must be >= 0'),
  ('top_k_greedy', None, {'top_k': 5}, r'^top_k=5 / top_p=1\.0 need sampling'),
  ('top_p_greedy', None, {'top_p': 0.9}, r'^top_k=0 / top_p=0\.9 need sampling'),
  ('no_prompt', None, {'prompts': []}, r'^no prompt given'),
  ('shape_override', 'num_layers', {}, r'model\.num_layers=3 \(the checkpoint has 2\)$'),
]


@pytest.mark.parametrize('change,kwargs,error', [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_fails_before_any_work(run_dir, tmp_path, monkeypatch, change, kwargs, error):
  def no_work(*args, **kwargs):
    raise AssertionError('restored parameters before validating the input')

  monkeypatch.setattr(generate_lib, 'restore_params', no_work)
  if change == 'empty':
    workdir = str(tmp_path)
  elif isinstance(change, dict):
    change = {k: _sample_tokenizer(run_dir) if v == 'SAMPLE' else v for k, v in change.items()}
    workdir = _workdir_with(run_dir, tmp_path, **change)
  else:
    workdir = run_dir
  cd = generate_lib.load_run_config(workdir) if change != 'empty' else None
  if change == 'num_layers':
    cd.model.num_layers = 3
  output = tmp_path / 'out' / 'out.jsonl'
  output.parent.mkdir()
  kwargs = {'prompts': PROMPTS, 'max_new_tokens': NEW, 'output': str(output), **kwargs}
  with pytest.raises(ConfigError, match=error) as e:
    generate_lib.generate(cd, workdir, **kwargs)
  assert '\n' not in str(e.value)
  assert not os.listdir(output.parent)


def _cli(*args, devices=1):
  env = {
    **os.environ,
    'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
    'JAX_PLATFORMS': 'cpu',
  }
  return subprocess.run(
    [sys.executable, 'generate.py', *args], cwd=ROOT, env=env, capture_output=True, text=True
  )


def test_cli_end_to_end(run_dir, reference, tmp_path):
  """Two --prompt flags and a --prompts_file, dp on 2 devices by a --config override."""
  ref, _ = reference
  prompts_file = tmp_path / 'prompts.txt'
  prompts_file.write_text(f'{PROMPTS[2]}\n\n')  # blank lines are skipped
  output = tmp_path / 'cli.jsonl'
  proc = _cli(
    f'--workdir={run_dir}',
    f'--prompt={PROMPTS[0]}',
    f'--prompt={PROMPTS[1]}',
    f'--prompts_file={prompts_file}',
    f'--max_new_tokens={NEW}',
    f'--output={output}',
    '--config.parallel.strategy=dp',
    devices=2,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[0] == f'[prompt 0, 15 tokens] {PROMPTS[0]}'
  assert lines[1].startswith('[completion 0, ')
  assert lines[-4].startswith('strategy: dp, batch 4 (3 prompts + 1 padding rows), ')
  assert lines[-3].startswith('prefill: ') and lines[-3].endswith(' ms')
  assert lines[-2].startswith('TPOT: ') and 'median of' in lines[-2]
  assert lines[-1].startswith('tokens/s: ')
  records = _read_jsonl(output)
  assert [r['prompt'] for r in records] == PROMPTS
  assert [r['tokens'] for r in records] == [c.tokens for c in ref.completions]


def test_cli_bad_input_is_one_line(run_dir, tmp_path):
  output = tmp_path / 'cli.jsonl'
  proc = _cli(f'--workdir={run_dir}', '--prompt=The', '--temperature=-1', f'--output={output}')
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if 'Error' in line]
  assert errors == ['ConfigError: temperature=-1.0 must be >= 0 (0 is greedy)']
  assert proc.stdout == '' and not output.exists()
