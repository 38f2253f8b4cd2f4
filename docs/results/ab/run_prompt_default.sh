#!/bin/bash
# The two A/B runs again after the default interleave prompt became "llamaindex" (engine/generation.py).
cd /work/main && source .venv/bin/activate
export RAGAS_DO_NOT_TRACK=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
run() { name=$1; shift; echo "=== $name start $(date +%T)"; /usr/bin/time -f "%e s wall" msa eval "$@" --out runs/ab/$name > runs/ab/$name.log 2>&1; echo "=== $name done rc=$? $(date +%T)"; tail -1 runs/ab/$name.log; }
run popqa-e2e-30-llamaprompt --dataset popqa --limit 30 --seed 0 --distractors 150 -k 3 --max-new-tokens 24 --quiet --systems rag-minilm,msa
run hotpotqa-e2e-llamaprompt --dataset hotpotqa --limit 10 --seed 0 --distractors 60 -k 3 --max-new-tokens 24 --quiet --systems rag-minilm,msa
echo "=== all done $(date +%T)"
