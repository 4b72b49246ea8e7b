"""bench/overlap.py's reading of scheduled HLO: async pairs, what lies between, where they sit."""

# The HLO below is one instruction per line, as the compiler prints it (the parser reads lines).
# ruff: noqa: E501

import sys

sys.path.insert(0, 'bench')

import overlap  # noqa: E402

# A scheduled module as the GPU compiler prints it (trimmed): an all-reduce-start/-done pair
# with a fusion between, a synchronous all-reduce, a collective-permute scheduled as a pair with
# nothing between (printed as one op), and a 3-branch conditional (ma_sep's tick: attention,
# experts, idle) whose expert branch holds an all-to-all pair with nothing between.
TICK = """HloModule jit_step, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_mul (p0: f32[8,4]) -> f32[8,4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  ROOT %mul = f32[8,4]{1,0} multiply(%p0, %p0)
}

%attention_branch (x.1: f32[8,4]) -> f32[8,4] {
  %x.1 = f32[8,4]{1,0} parameter(0)
  ROOT %gemm = f32[8,4]{1,0} custom-call(%x.1, %x.1), custom_call_target="__cublas$gemm"
}

%experts_branch (x.2: f32[8,4]) -> f32[8,4] {
  %x.2 = f32[8,4]{1,0} parameter(0)
  %all-to-all-start = ((f32[8,4]{1,0}), f32[8,4]{1,0}) all-to-all-start(f32[8,4]{1,0} %x.2), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7},{8,9,10,11},{12,13,14,15}}, dimensions={0}, backend_config={"operation_queue_id":"0","collective_backend_config":{"is_sync":true,"no_parallel_custom_call":false}}
  ROOT %all-to-all-done = f32[8,4]{1,0} all-to-all-done(((f32[8,4]{1,0}), f32[8,4]{1,0}) %all-to-all-start)
}

%idle_branch (x.3: f32[8,4]) -> f32[8,4] {
  ROOT %x.3 = f32[8,4]{1,0} parameter(0)
}

ENTRY %main (p: f32[8,4], i: s32[]) -> f32[8,4] {
  %p = f32[8,4]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %all-reduce-start = f32[8,4]{1,0} all-reduce-start(%p), channel_id=1, replica_groups=[1,16]<=[16], to_apply=%add, metadata={op_name="jit(step)/shard_map/psum"}, backend_config={"collective_backend_config":{"is_sync":false}}
  %bitcast.1 = f32[32]{0} bitcast(%p)
  %loop_multiply_fusion = f32[8,4]{1,0} fusion(%p), kind=kLoop, calls=%fused_mul
  %all-reduce-done = f32[8,4]{1,0} all-reduce-done(%all-reduce-start)
  %all-reduce.2 = f32[8,4]{1,0} all-reduce(%all-reduce-done), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7},{8,9,10,11},{12,13,14,15}}, to_apply=%add
  %ppermute.1 = f32[8,4]{1,0} collective-permute(%all-reduce.2), channel_id=4, source_target_pairs={{12,0},{13,1},{14,2},{15,3}}, metadata={op_name="jit(step)/shard_map/ppermute" scheduling_name="collective-permute-start.3"}, backend_config={"collective_backend_config":{"is_sync":true}}
  ROOT %conditional = f32[8,4]{1,0} conditional(%i, %ppermute.1, %all-reduce.2, %loop_multiply_fusion), branch_computations={%attention_branch, %experts_branch, %idle_branch}
}
"""

# A while loop of 4 iterations whose collective-permute is pipelined across iterations: the
# start ends one iteration (into the loop state), the done comes late in the next, after a fusion
# holding a dot.
PIPELINED = """HloModule jit_loop, is_scheduled=true

%fused_dot (q0: bf16[8,4], q1: bf16[4,4]) -> bf16[8,4] {
  %q0 = bf16[8,4]{1,0} parameter(0)
  %q1 = bf16[4,4]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,4]{1,0} dot(%q0, %q1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (state: (bf16[8,4], bf16[4,4], (bf16[8,4], bf16[8,4], u32[], u32[]))) -> (bf16[8,4], bf16[4,4], (bf16[8,4], bf16[8,4], u32[], u32[])) {
  %state = (bf16[8,4]{1,0}, bf16[4,4]{1,0}, (bf16[8,4]{1,0}, bf16[8,4]{1,0}, u32[], u32[])) parameter(0)
  %get-tuple-element.0 = bf16[8,4]{1,0} get-tuple-element(%state), index=0
  %get-tuple-element.1 = bf16[4,4]{1,0} get-tuple-element(%state), index=1
  %gemm_fusion = bf16[8,4]{1,0} fusion(%get-tuple-element.0, %get-tuple-element.1), kind=kCustom, calls=%fused_dot
  %get-tuple-element.2 = (bf16[8,4]{1,0}, bf16[8,4]{1,0}, u32[], u32[]) get-tuple-element(%state), index=2
  %collective-permute-done = bf16[8,4]{1,0} collective-permute-done(%get-tuple-element.2)
  %collective-permute-start = (bf16[8,4]{1,0}, bf16[8,4]{1,0}, u32[], u32[]) collective-permute-start(%collective-permute-done), channel_id=5, source_target_pairs={{12,0},{13,1},{14,2},{15,3}}, backend_config={"collective_backend_config":{"is_pipelined":true}}
  ROOT %tuple = (bf16[8,4]{1,0}, bf16[4,4]{1,0}, (bf16[8,4]{1,0}, bf16[8,4]{1,0}, u32[], u32[])) tuple(%gemm_fusion, %get-tuple-element.1, %collective-permute-start)
}

%cond (state.1: (bf16[8,4], bf16[4,4], (bf16[8,4], bf16[8,4], u32[], u32[]))) -> pred[] {
  %state.1 = (bf16[8,4]{1,0}, bf16[4,4]{1,0}, (bf16[8,4]{1,0}, bf16[8,4]{1,0}, u32[], u32[])) parameter(0)
  ROOT %true = pred[] constant(true)
}

ENTRY %main (s: (bf16[8,4], bf16[4,4], (bf16[8,4], bf16[8,4], u32[], u32[]))) -> (bf16[8,4], bf16[4,4], (bf16[8,4], bf16[8,4], u32[], u32[])) {
  %s = (bf16[8,4]{1,0}, bf16[4,4]{1,0}, (bf16[8,4]{1,0}, bf16[8,4]{1,0}, u32[], u32[])) parameter(0)
  ROOT %while = (bf16[8,4]{1,0}, bf16[4,4]{1,0}, (bf16[8,4]{1,0}, bf16[8,4]{1,0}, u32[], u32[])) while(%s), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
}
"""


def _by_kind(records):
  return {r['kind']: [x for x in records if x['kind'] == r['kind']] for r in records}


def test_async_pair_with_fusion_between_and_a_sync_all_reduce():
  records = overlap.collectives(TICK)
  kinds = _by_kind(records)
  assert sorted(kinds) == ['all-reduce', 'all-to-all', 'collective-permute']
  sync = [r for r in kinds['all-reduce'] if not r['async']]
  pair = [r for r in kinds['all-reduce'] if r['async']]
  assert len(sync) == 1 and len(pair) == 1
  assert sync[0]['group'] == 4 and sync[0]['bytes'] == 8 * 4 * 4 and not sync[0]['was_async']
  (permute,) = kinds['collective-permute']
  assert not permute['async'] and permute['was_async'] and permute['group'] == 4
  pair = pair[0]
  assert pair['paired'] and pair['start'] == 'all-reduce-start' and not pair['is_sync']
  assert pair['group'] == 16 and pair['bytes'] == 128
  assert pair['location'] == 'outside conditionals' and pair['executions'] == 1
  # The bitcast lies between too, but only the fusion is compute; it holds no matmul.
  assert pair['between'] == 2 and pair['compute'] == 1 and pair['matmuls'] == 0
  assert pair['compute_names'] == ['loop_multiply_fusion']
  assert pair['op_name'] == 'jit(step)/shard_map/psum'
  (a2a,) = kinds['all-to-all']
  assert a2a['location'] == 'branch 1 (experts)' and a2a['group'] == 4
  assert a2a['paired'] and a2a['is_sync'] and a2a['between'] == 0 and a2a['compute'] == 0

  summary = overlap.summarise(records)
  total = summary['all']
  assert (total['sync'], total['async'], total['overlapped'], total['marked_sync']) == (2, 2, 1, 1)
  assert total['sync_was_async'] == 1 and total['overlapped_heavy'] == 0
  assert total['bytes_overlapped'] == 128 and total['bytes_sync'] == 256
  assert summary['by_location']['branch 1 (experts)']['async'] == 1
  assert summary['by_kind']['all-reduce']['overlapped'] == 1
  assert summary['by_kind']['all-to-all']['overlapped'] == 0


def test_pipelined_pair_across_loop_iterations():
  (record,) = overlap.collectives(PIPELINED)
  assert record['kind'] == 'collective-permute' and record['group'] == 4
  assert record['paired'] and record['across_iterations'] and record['is_pipelined']
  # From the start (end of an iteration) to the done in the next: the ROOT tuple, then the
  # loop parameter, three get-tuple-elements and the fusion, whose dot makes it a matmul.
  assert record['between'] == 6 and record['compute'] == 1 and record['matmuls'] == 1
  assert record['matmul_names'] == ['gemm_fusion']
  assert record['executions'] == 4 and record['bytes'] == 8 * 4 * 2
  assert record['location'] == 'outside conditionals' and 'while body' in record['path']
  assert overlap.summarise([record])['all']['bytes_overlapped_heavy_per_step'] == 4 * 64


def test_start_without_its_done_is_unpaired():
  text = """HloModule jit_half, is_scheduled=true

ENTRY %main (p: f32[8,4]) -> (f32[8,4], f32[32,4]) {
  %p = f32[8,4]{1,0} parameter(0)
  ROOT %all-gather-start = (f32[8,4]{1,0}, f32[32,4]{1,0}) all-gather-start(%p), channel_id=1, replica_groups=[4,4]<=[16], dimensions={0}
}
"""
  (record,) = overlap.collectives(text)
  assert record['kind'] == 'all-gather' and record['async'] and not record['paired']
  total = overlap.summarise([record])['all']
  assert (total['async'], total['unpaired'], total['overlapped']) == (0, 1, 0)
  assert total['bytes_unpaired_per_step'] == (8 + 32) * 4 * 4
