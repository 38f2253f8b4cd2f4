"""Model families, the MSA-4B checkpoint format, router adapters, answering modes and streaming."""

import glob
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from msa_plugins import MSAEngine
from msa_plugins import UnsupportedModelError
from msa_plugins.engine.router import Router
from msa_plugins.kernels.routing import fold_queries
from msa_plugins.engine.encoding import normalise_heads, pool_chunks
from msa_plugins.engine.generation import build_prompt

DOCS = ["Paris is the capital of France.", "Alice was born in Lisbon and works as a painter.",
        "The quick brown fox jumps over the lazy dog."]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_each_family_ingests_routes_and_answers(tiny_model_dir, family):
    e = MSAEngine.from_pretrained(tiny_model_dir(family), device="cpu", chunk_size=4)
    e.add(DOCS)
    for mode in ("interleave", "sparse"):
        res = e.query("Where was Alice born?", mode=mode, k=2, max_new_tokens=4)
        assert len(res.documents) == 2 and res.mode == mode
        assert res.completion_tokens <= 4 and res.prompt_tokens > 0
        assert set(res.timings) == {"routing_s", "prefill_s", "decode_s", "first_token_s", "total_s"}
        assert all(v >= 0 for v in res.timings.values())


def test_unsupported_family_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="llama, qwen2, qwen3, mistral"):
        MSAEngine.from_pretrained(str(tmp_path), device="cpu")


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local Hugging Face model folder"):
        MSAEngine.from_pretrained(str(tmp_path / "nope"), device="cpu")


def _write_msa4b(src: str, dst: str, layers, seed=1):
    """A tiny Qwen3 in the MSA-4B format: the model plus router_q_proj / router_k_proj on routing layers."""
    shutil.copytree(src, dst)
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    hd = cfg.head_dim
    (path,) = glob.glob(os.path.join(dst, "*.safetensors"))
    sd = load_file(path)
    for l in layers:
        sd[f"model.layers.{l}.self_attn.router_q_proj.0.weight"] = torch.randn(cfg.num_attention_heads * hd, cfg.hidden_size, generator=g)
        sd[f"model.layers.{l}.self_attn.router_k_proj.0.weight"] = torch.randn(cfg.num_key_value_heads * hd, cfg.hidden_size, generator=g)
    save_file(sd, path, metadata={"format": "pt"})
    return dst


def test_msa4b_checkpoint_loads_its_router_and_routes_with_it(tiny_model_dir, tmp_path):
    path = _write_msa4b(tiny_model_dir("qwen3"), str(tmp_path / "msa4b"), layers=[2, 3])
    e = MSAEngine.from_pretrained(path, device="cpu", chunk_size=4)
    assert e.router.kind == "router" and e.routing_layers == [2, 3]
    sd = load_file(glob.glob(os.path.join(path, "*.safetensors"))[0])
    torch.testing.assert_close(e.router.wq[2], sd["model.layers.2.self_attn.router_q_proj.0.weight"])
    e.add(DOCS, ids=["a", "b", "c"])
    # routing keys are mean_pool(H) @ W_KR^T with H the layer's normalised input, per head unit-normalised
    q = "Where was Alice born?"
    prompt = build_prompt(e.model, q)
    h_q, _ = e.encoder.question_states(prompt.ids, prompt.question_mask)
    m = e.model
    expected = []
    for i, l in enumerate([2, 3]):
        wq = sd[f"model.layers.{l}.self_attn.router_q_proj.0.weight"]
        wk = sd[f"model.layers.{l}.self_attn.router_k_proj.0.weight"]
        qf = fold_queries((h_q[i] @ wq.T).view(1, -1, m.n_heads, m.head_dim), m.n_kv_heads)[0]
        row = []
        for text in DOCS:
            hs = {}
            ids = torch.tensor([e._tokenize(text)])
            m.forward(ids, torch.arange(ids.shape[1])[None], last_layer=l,
                      capture=lambda c: hs.__setitem__(c.layer, c.h_norm[0]))
            kr = normalise_heads(pool_chunks(hs[l] @ wk.T, 4), m.n_kv_heads)
            row.append(float((qf @ kr.T).max()))
        expected.append(row)
    agg = torch.tensor(expected).mean(0)
    r = e.route(q, k=3)
    assert r.ids == [["a", "b", "c"][j] for j in agg.argsort(descending=True).tolist()]
    torch.testing.assert_close(torch.tensor(r.scores), agg.sort(descending=True).values, atol=1e-4, rtol=1e-4)


def test_router_adapter_round_trip_and_mismatch(tiny_model_dir, tmp_path):
    path = _write_msa4b(tiny_model_dir("qwen3"), str(tmp_path / "msa4b"), layers=[2, 3])
    e = MSAEngine.from_pretrained(path, device="cpu")
    e.router.save(str(tmp_path / "adapter"))
    r2 = Router.load(str(tmp_path / "adapter"))
    assert r2.fingerprint() == e.router.fingerprint()
    for l in (2, 3):
        assert torch.equal(r2.wq[l], e.router.wq[l]) and torch.equal(r2.wk[l], e.router.wk[l])
    # an adapter made for one model refuses a model of other shapes
    with pytest.raises(ValueError, match="router"):
        MSAEngine.from_pretrained(tiny_model_dir("llama"), router=str(tmp_path / "adapter"), device="cpu")


def test_stream_yields_the_answer_and_protocol_needs_a_router(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu")
    e.add(DOCS)
    s = e.stream("Where was Alice born?", max_new_tokens=5, k=2)
    assert [d.rank for d in s.documents] == [0, 1]
    pieces = list(s)
    full = e.query("Where was Alice born?", max_new_tokens=5, k=2)
    assert "".join(pieces).strip() == full.answer and s.result.answer == full.answer
    with pytest.raises(ValueError, match="protocol"):
        e.query("Where was Alice born?", mode="protocol")


def test_interleave_rounds_add_documents_without_repeats(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu")
    e.add(DOCS + ["Lisbon is the capital of Portugal.", "Germany borders France."])
    res = e.query("Where was Alice born?", k=1, rounds=3, max_new_tokens=2)
    ids = [d.id for d in res.documents]
    assert len(ids) == len(set(ids)) and 1 <= len(res.rounds) <= 3
    assert [d.round for d in res.documents] == sorted(d.round for d in res.documents)


def test_protocol_mode_runs_with_a_trained_router(tiny_model_dir, tmp_path):
    path = _write_msa4b(tiny_model_dir("qwen3"), str(tmp_path / "msa4b"), layers=[2, 3])
    e = MSAEngine.from_pretrained(path, device="cpu", max_rounds=2)
    e.add(DOCS)
    res = e.query("Where was Alice born?", mode="protocol", max_new_tokens=6, k=2)
    assert res.mode == "protocol" and res.completion_tokens <= 6 and len(res.rounds) <= 3


def test_host_content_tier_gives_the_same_sparse_answer(tiny_model_dir, tmp_path):
    answers = []
    for tier in ("device", "host"):
        e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, content_tier=tier)
        e.add(DOCS, ids=["a", "b", "c"])
        e.save(str(tmp_path / tier))
        e.load(str(tmp_path / tier))  # content now memory-mapped from disk
        res = e.query("Where was Alice born?", mode="sparse", k=2, max_new_tokens=5)
        answers.append((res.answer, [d.id for d in res.documents]))
    assert answers[0] == answers[1]
    with pytest.raises(ValueError, match="content_tier"):
        MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", content_tier="disk")


def test_failed_set_router_changes_nothing_and_keep_inputs_is_adopted(tiny_model_dir, tmp_path):
    from msa_plugins import RouterMismatchError

    path = _write_msa4b(tiny_model_dir("qwen3"), str(tmp_path / "msa4b"), layers=[2, 3])
    e = MSAEngine.from_pretrained(path, device="cpu", chunk_size=4, keep_inputs=True)
    e.add(DOCS, ids=["a", "b", "c"])
    keys = e._bank.state.keys_r.clone()
    before = (e.router.fingerprint(), e._bank.fingerprint["key_mode"], e.route("Where was Alice born?", k=3).ids)
    partial = Router({2: e.router.wq[2]}, {2: e.router.wk[2]}, e.model.n_heads, e.model.n_kv_heads, e.model.head_dim)
    with pytest.raises(RouterMismatchError, match="no projectors for routing layers"):
        e.set_router(partial)
    assert torch.equal(e._bank.state.keys_r, keys)
    assert (e.router.fingerprint(), e._bank.fingerprint["key_mode"], e.route("Where was Alice born?", k=3).ids) == before
    # a memory built with keep_inputs stays re-keyable when an engine without the flag extends it
    e.save(str(tmp_path / "mem"))
    e2 = MSAEngine.from_pretrained(path, device="cpu", chunk_size=4, memory=str(tmp_path / "mem"))
    e2.add(["Lisbon is the capital of Portugal."], ids=["d"])
    s = e2._bank.state
    assert s.inputs is not None and s.inputs.shape[1] == s.n_chunks


def test_routed_documents_that_overflow_the_window_are_dropped_lowest_first(tmp_path, caplog):
    from tiny_models import make_tiny_model

    path = make_tiny_model("llama", str(tmp_path / "small-window"), max_position_embeddings=256)
    e = MSAEngine.from_pretrained(path, device="cpu", max_doc_tokens=100, prompt_style="msa")
    long_docs = [" ".join(["Paris is the capital of France."] * 8) + f" Fact {i}." for i in range(4)]  # ~85 tokens each
    e.add(long_docs)
    with caplog.at_level("WARNING", logger="msa_plugins"):
        res = e.query("What is the capital of France?", k=4, max_new_tokens=4)
    assert "do not fit the model's window" in caplog.text
    assert 1 <= len(res.documents) < 4
    assert res.prompt_tokens + 4 <= e.model.max_positions
    with pytest.raises(ValueError, match="does not fit the model's window"):
        e.generate("word " * 400, max_new_tokens=4)


def test_hub_ids_use_the_cache_offline_and_fail_clearly_when_not_cached(tiny_model_dir, tmp_path, monkeypatch):
    """A hub id resolves through the Hugging Face cache (what a download leaves there); offline and not
    cached, the error says so. No network is used: HF_HUB_OFFLINE is set."""
    import shutil

    from msa_plugins import PathNotFoundError

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir("llama"), snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir(parents=True)
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    e = MSAEngine.from_pretrained("tiny-org/tiny-llama", device="cpu")
    assert e.model_name == "tiny-org/tiny-llama"
    e.add(["Alice was born in Lisbon."], ids=["a"], progress=False)
    assert [d.id for d in e.retrieve("Where was Alice born?")] == ["a"]
    with pytest.raises(PathNotFoundError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        MSAEngine.from_pretrained("tiny-org/not-downloaded", device="cpu")
    with pytest.raises(PathNotFoundError, match="neither a local"):
        MSAEngine.from_pretrained(str(tmp_path / "nowhere" / "deeper" / "x"), device="cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load_and_route(tiny_model_dir, tmp_path, dtype):
    """A local folder saved in bf16/fp16 (as most hub checkpoints are) loads and answers on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir("qwen3")
    half = tmp_path / dtype
    AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).save_pretrained(half)
    AutoTokenizer.from_pretrained(src).save_pretrained(half)
    e = MSAEngine.from_pretrained(str(half), device="cpu", chunk_size=4, max_new_tokens=2)
    e.add(DOCS, ids=["a", "b", "c"], progress=False)
    res = e.query("Where was Alice born?", k=2)
    assert len(res.documents) == 2 and res.completion_tokens >= 1
