#!/bin/bash
# Prompt vs retrieval separation (MSA's answer gap on PopQA): each retriever's documents in each prompt style.
cd /work/main && source .venv/bin/activate
export RAGAS_DO_NOT_TRACK=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
run() { name=$1; shift; echo "=== $name start $(date +%T)"; /usr/bin/time -f "%e s wall" msa eval "$@" --out runs/ab/$name > runs/ab/$name.log 2>&1; echo "=== $name done rc=$? $(date +%T)"; tail -1 runs/ab/$name.log; }
run popqa-e2e-30-promptsep --dataset popqa --limit 30 --seed 0 --distractors 150 -k 3 --max-new-tokens 24 --quiet --systems rag-minilm,rag-minilm-msaprompt,msa,msa-llamaprompt,msa-llamauser
run hotpotqa-e2e-promptsep --dataset hotpotqa --limit 10 --seed 0 --distractors 60 -k 3 --max-new-tokens 24 --quiet --systems rag-minilm,rag-minilm-msaprompt,msa,msa-llamaprompt,msa-llamauser
echo "=== all done $(date +%T)"
