"""Our forward against Hugging Face's: dense logits, and sparse mode against one dense forward under the
explicit MSA mask (documents isolated, document-local positions, question offset, lower layers blind)."""

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from msa_plugins import MSAEngine
from msa_plugins.engine.generation import build_prompt, sparse_memory
from msa_plugins.engine.model import KVCache

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
DOCS = ["Paris is the capital of France.", "Alice was born in Lisbon and works as a painter.",
        "The quick brown fox jumps over the lazy dog.", "Berlin is the capital of Germany."]

_MASKS = {}  # layer index -> bool mask [S, S] for the reference attention below


def _masked_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain attention with a per-layer boolean mask: the reference for the MSA mask."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    w = (query @ key.transpose(2, 3)) * scaling
    w = w.masked_fill(~_MASKS[module.layer_idx], float("-inf"))
    w = torch.softmax(w.float(), dim=-1).to(query.dtype)
    return (w @ value).transpose(1, 2).contiguous(), w


AttentionInterface.register("msa_reference_mask", _masked_eager_attention)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_forward_matches_transformers(tiny_model_dir, family):
    engine = MSAEngine.from_pretrained(tiny_model_dir(family), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32)
    ids = torch.tensor([engine.model.tokenizer("Where was Alice born? In Lisbon.")["input_ids"]])
    ours = engine.model.forward(ids, torch.arange(ids.shape[1])[None], logits="all")
    torch.testing.assert_close(ours, hf(ids).logits.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sparse_mode_equals_dense_forward_under_msa_mask(tiny_model_dir, family):
    engine = MSAEngine.from_pretrained(tiny_model_dir(family), device="cpu", chunk_size=1)
    engine.add(DOCS)
    q = "Where was Alice born?"
    state = engine._bank.state
    routing = engine.route(q, k=10)  # k >= number of documents: every layer selects all of them
    assert routing.per_layer_rows.shape[1] == len(DOCS)
    memory = sparse_memory(state, routing.per_layer_rows, engine.model.n_layers, engine.routing_layers, engine.model)
    prompt = build_prompt(engine.model, q)
    k = len(DOCS)
    cache = KVCache(engine.model.n_layers, memory=memory)
    ours = engine.model.forward(torch.tensor([prompt.ids]), k + torch.arange(len(prompt.ids))[None], cache=cache,
                                logits="all")[0]

    # Reference: one forward over [doc_1; ...; doc_n; prompt] in the order layer 0's selection used
    doc_rows = [int(r) for r in routing.per_layer_rows[0]]
    assert all(sorted(int(r) for r in rows) == sorted(doc_rows) for rows in routing.per_layer_rows)
    doc_tokens = [engine._tokenize(state.texts[r]) for r in doc_rows]
    seq, pos, owner = [], [], []
    for d, toks in enumerate(doc_tokens):
        seq += toks; pos += list(range(len(toks))); owner += [d] * len(toks)  # document-local positions
    n_mem = len(seq)
    seq += prompt.ids; pos += [k + i for i in range(len(prompt.ids))]; owner += [-1] * len(prompt.ids)
    S = len(seq)
    owner_t = torch.tensor(owner)
    idx = torch.arange(S)
    causal = idx[:, None] >= idx[None, :]
    same_doc = (owner_t[:, None] == owner_t[None, :]) & (owner_t[:, None] >= 0)
    question_self = (owner_t[:, None] < 0) & (owner_t[None, :] < 0) & causal
    question_sees_docs = (owner_t[:, None] < 0) & (owner_t[None, :] >= 0)
    lower = (same_doc & causal) | question_self
    upper = lower | question_sees_docs
    _MASKS.clear()
    for layer in range(engine.model.n_layers):
        _MASKS[layer] = upper if layer in engine.routing_layers else lower
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32)
    hf.set_attn_implementation("msa_reference_mask")
    ref = hf(torch.tensor([seq]), position_ids=torch.tensor([pos])).logits[0, n_mem:].float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # and the memory really matters: without it the question's logits differ
    plain = engine.model.forward(torch.tensor([prompt.ids]), k + torch.arange(len(prompt.ids))[None], logits="all")[0]
    assert (plain - ref).abs().max() > 1e-3
