#!/bin/bash
cd /work/main && source .venv/bin/activate
export RAGAS_DO_NOT_TRACK=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
while ! grep -q "niah-64k done" runs/ab/run_more.log; do sleep 5; done
echo "=== popqa-e2e-30 start $(date +%T)"
/usr/bin/time -f "%e s wall" msa eval --dataset popqa --limit 30 --seed 0 --distractors 150 -k 3 --max-new-tokens 24 --systems rag-minilm,msa --out runs/ab/popqa-e2e-30 > runs/ab/popqa-e2e-30.log 2>&1
echo "=== popqa-e2e-30 done rc=$? $(date +%T)"
