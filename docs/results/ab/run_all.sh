#!/bin/bash
# First A/B results (issue 3): one run after another on the 2-core CPU.
cd /work/main && source .venv/bin/activate
export RAGAS_DO_NOT_TRACK=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
run() { name=$1; shift; echo "=== $name start $(date +%T)"; /usr/bin/time -f "%e s wall" msa eval "$@" --out runs/ab/$name > runs/ab/$name.log 2>&1; echo "=== $name done rc=$? $(date +%T)"; tail -1 runs/ab/$name.log; }
run popqa-e2e --dataset popqa --limit 20 --seed 0 --distractors 60 -k 3 --max-new-tokens 24 --systems rag-minilm,msa
run niah-32k --dataset niah --niah-sizes 32768 --limit 2 --seed 0 -k 3 --max-new-tokens 24 --systems rag-minilm,msa
run musique-e2e --dataset musique --limit 10 --seed 0 --distractors 60 -k 3 --max-new-tokens 24 --systems rag-minilm,msa
run hotpotqa-e2e --dataset hotpotqa --limit 10 --seed 0 --distractors 60 -k 3 --max-new-tokens 24 --systems rag-minilm,msa
run narrativeqa-e2e --dataset narrativeqa --limit 8 --seed 0 --distractors 100 -k 3 --max-new-tokens 24 --systems rag-minilm,msa
run popqa-retrieval --dataset popqa --limit 20 --seed 0 --distractors 60 -k 3 --retrieval-only --systems rag-minilm,rag-bm25,msa,msa-training-free
echo "=== all done $(date +%T)"
