"""The A/B evaluation instrument: the same questions through a RAG pipeline (A) and MSA (B).

Modules (import them directly; heavy dependencies load only inside the modules that need them):
- datasets: loaders -> EvalSet / EvalDoc / EvalQuestion (HippoRAG, MSA benchmark format, LoCoMo, JSONL)
- niah: RULER-style needle-in-a-haystack memories
- metrics: recall@k, hit@k, MRR, latency, RAGAS non-LLM metrics, optional LLM judge
- baselines: LlamaIndex MiniLM vector index and BM25 retrievers, RAG answering (system A)
- harness: run_retrieval_eval / run_ab_eval, where every system is just a function
- msa_system: an MSAEngine as such functions (msa_retrieve_fn, msa_answer_fn)
- report: per-run folder with JSONL records, JSON summary, Markdown table and PNG charts
- ab: `run_eval`, the one-call A/B run behind `msa eval` (and the one list of SYSTEMS / DATASETS)

Data root: every loader takes `data_root=`; without it, $MSA_DATASETS, else `../shared/datasets`
relative to the current working directory.

Needs the `eval` extra (ragas, bm25s, sentence-transformers, llama-index-core, matplotlib, ...);
`datasets` and `niah` need only the standard library.
"""
from .datasets import EvalDoc, EvalQuestion, EvalSet

__all__ = ["EvalDoc", "EvalQuestion", "EvalSet"]
