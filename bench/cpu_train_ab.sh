#!/usr/bin/env bash
# `chatforge train smollm2_135m_identity_lora` (24 steps, the demo's data) at two checkouts, alternately,
# from /tmp (so that neither checkout's folder shadows the other): wall, loop, real tokens/s, final loss.
#   bash bench/cpu_train_ab.sh OLD_TREE NEW_TREE DATA
OLD=$1 NEW=$2 DATA=$3
set -e; cd /tmp
for tree in "$OLD" "$NEW" "$OLD" "$NEW"; do
  rm -rf /tmp/ab_run
  s=$(date +%s.%N)
  PYTHONPATH=$tree python3 -m chatforge train smollm2_135m_identity_lora data="$DATA" output_dir=/tmp/ab_run max_steps=24 save_every=0 "eval_prompts=[]" --no-progress > /dev/null 2>&1
  e=$(date +%s.%N)
  python3 -c "
import json;rows=[json.loads(l) for l in open('/tmp/ab_run/log.jsonl')]
print('$tree', 'wall %.1f s'%($e-$s), 'loop %.1f s'%rows[-1]['elapsed_s'], 'real tok/s', rows[-1]['tokens_per_s'], 'final loss', rows[-1]['loss'])"
done
