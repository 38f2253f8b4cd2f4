#!/bin/bash
cd /work/main && source .venv/bin/activate
export RAGAS_DO_NOT_TRACK=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
while ! grep -q "all done" runs/ab/run_all.log; do sleep 5; done
# NIAH again with room for the whole 7-digit value (SmolLM2 writes digits one token each; 24 tokens cut it off)
echo "=== niah-32k-48tok start $(date +%T)"
/usr/bin/time -f "%e s wall" msa eval --dataset niah --niah-sizes 32768 --limit 5 --seed 0 -k 3 --max-new-tokens 48 --systems rag-minilm,msa --out runs/ab/niah-32k-48tok > runs/ab/niah-32k-48tok.log 2>&1
echo "=== niah-32k-48tok done rc=$? $(date +%T)"
echo "=== niah-64k start $(date +%T)"
/usr/bin/time -f "%e s wall" msa eval --dataset niah --niah-sizes 65536 --limit 2 --seed 0 -k 3 --max-new-tokens 48 --systems rag-minilm,msa --out runs/ab/niah-64k > runs/ab/niah-64k.log 2>&1
echo "=== niah-64k done rc=$? $(date +%T)"
