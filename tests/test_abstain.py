"""Calibrated "not in memory": a threshold learned on dev questions, stored with the memory,
and `query(..., abstain=True)` answering NOT_IN_MEMORY with `QueryResult.abstained` below it."""

import json

import pytest

from msa_plugins import InvalidArgumentError, MSAEngine
from msa_plugins.config import NOT_IN_MEMORY
from msa_plugins.core import _best_threshold

DOCS = {
    "lisbon": "Alice was born in Lisbon, the capital of Portugal.",
    "paris": "Paris is the capital of France and its largest city.",
    "pin": "Ana's bank PIN is 4321; she never shares it.",
    "garden": "Tomatoes grow best in warm gardens with plenty of sun.",
}
DEV = [("Where was Alice born?", ["lisbon"]), ("What is the capital of France?", ["paris"]),
       ("What is Ana's PIN?", ["pin"]), ("How do tomatoes grow?", ["garden"])]


@pytest.fixture()
def engine(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=2, max_new_tokens=2)
    e.add(list(DOCS.values()), ids=list(DOCS), progress=False)
    return e


def test_best_threshold_separates_and_reports_precision_recall():
    t, stats = _best_threshold(answerable=[0.9, 0.8, 0.7], removed=[0.1, 0.2, 0.75])
    assert 0.2 < t < 0.7 and stats["dev_recall"] == pytest.approx(2 / 3) and stats["dev_precision"] == 1.0
    t, stats = _best_threshold(answerable=[0.5], removed=[0.4])
    assert t == pytest.approx(0.45) and stats["dev_balanced_accuracy"] == 1.0


def test_abstain_needs_a_calibration(engine):
    with pytest.raises(InvalidArgumentError, match="calibrate_abstention"):
        engine.query("Where was Alice born?", abstain=True)
    assert not getattr(engine.query("Where was Alice born?"), "abstained", False)


def test_calibrated_threshold_decides_and_is_saved_with_the_memory(engine, tmp_path, tiny_model_dir):
    cal = engine.calibrate_abstention([q for q, _ in DEV], [g for _, g in DEV])
    assert cal["signal"] == "top1" and cal["n_dev"] == 4 and 0 <= cal["dev_recall"] <= 1
    top1 = {q: engine.retrieve(q, k=1)[0].score for q, _ in DEV}
    for q, _ in DEV:
        res = engine.query(q, abstain=True)
        abstained = getattr(res, "abstained", False)
        assert abstained == (top1[q] < cal["threshold"])
        if abstained:
            assert res.answer == NOT_IN_MEMORY and res.documents == [] and res.finish_reason == "abstained"
        else:
            assert res.documents and res.completion_tokens > 0
    # forcing each side: a threshold above every score abstains, one below none does
    engine._bank.set_calibration({**cal, "threshold": 10.0})
    res = engine.query("Where was Alice born?", abstain=True)
    assert res.abstained is True and res.answer == NOT_IN_MEMORY
    assert [p for p in engine.stream("Where was Alice born?", abstain=True)] == [NOT_IN_MEMORY]
    engine._bank.set_calibration({**cal, "threshold": -10.0})
    assert not getattr(engine.query("Where was Alice born?", abstain=True), "abstained", False)
    # saved in the manifest, loaded back, kept across adds, reset when the memory is re-keyed
    engine.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["calibration"]["threshold"] == -10.0
    other = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    other.load(tmp_path / "m")
    assert other.snapshot()._state.calibration["threshold"] == -10.0
    other.add(["Bob lives in Oslo."], ids=["bob"], progress=False)
    assert other.snapshot()._state.calibration["threshold"] == -10.0


def test_abstains_when_nothing_can_be_routed_to(engine):
    res = engine.query("Where was Alice born?", abstain=True, collection="nobody")
    assert res.abstained is True and res.documents == []


def test_calibration_checks_its_input(engine):
    with pytest.raises(InvalidArgumentError, match="not in the memory"):
        engine.calibrate_abstention(["Where was Alice born?"], [["nobody"]])
    with pytest.raises(InvalidArgumentError):
        engine.calibrate_abstention(["a", "b"], [["lisbon"]])
    with pytest.raises(InvalidArgumentError):
        engine.calibrate_abstention(["a"], [["lisbon"]], signal="entropy")
    cal = engine.calibrate_abstention([q for q, _ in DEV], [g for _, g in DEV], signal="margin")
    assert cal["signal"] == "margin"


def test_abstain_reads_router_scores_also_under_hybrid_routing(engine):
    engine.calibrate_abstention([q for q, _ in DEV], [g for _, g in DEV])
    engine._bank.set_calibration({"threshold": 10.0, "signal": "top1"})
    assert engine.query("Where was Alice born?", abstain=True, routing="hybrid").abstained is True
    with pytest.raises(InvalidArgumentError, match="lexical"):
        engine.query("Where was Alice born?", abstain=True, routing="lexical")


def test_margin_calibration_on_one_document_stays_finite_and_loads(tiny_model_dir, tmp_path):
    # one document: every answerable margin is +inf (nothing to be second), every removed one -inf (nothing
    # left); the threshold must still be finite, or the saved manifest would hold Infinity and never load
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=2, max_new_tokens=2)
    e.add([DOCS["lisbon"]], ids=["lisbon"], progress=False)
    cal = e.calibrate_abstention(["Where was Alice born?"], [["lisbon"]], signal="margin")
    assert cal["threshold"] == 0.0 and cal["dev_balanced_accuracy"] == 1.0
    assert not e.query("Where was Alice born?", abstain=True).abstained
    e.save(tmp_path / "m")
    other = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    other.load(tmp_path / "m")
    assert other.snapshot()._state.calibration["threshold"] == 0.0
    t, _ = _best_threshold(answerable=[float("inf"), 0.3], removed=[float("-inf"), 0.1])
    assert 0.1 < t < 0.3


def test_a_non_finite_calibration_is_refused_and_the_saved_copy_kept(engine, tmp_path):
    engine.save(tmp_path / "m")
    for bad in (float("inf"), float("nan"), None, 1):
        with pytest.raises(InvalidArgumentError, match="finite float"):
            engine._bank.set_calibration({"threshold": bad, "signal": "margin"})
    assert engine.snapshot()._state.calibration is None
