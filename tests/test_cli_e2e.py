"""The `msa` CLI and one end-to-end run on the embedded default model (SmolLM2-135M-Instruct)."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DOCS = os.path.join(ROOT, "msa_plugins", "data", "demo", "docs")
MSA = [sys.executable, "-m", "msa_plugins.cli"]


def run(args, cwd=ROOT, **kw):
    return subprocess.run(MSA + args, capture_output=True, text=True, cwd=cwd, timeout=600, **kw)


def start(args, cwd=ROOT):
    return subprocess.Popen(MSA + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def saved_documents(model_dir, mem) -> dict:
    """id -> text of a saved memory, read back through the public API."""
    from msa_plugins import MSAEngine

    engine = MSAEngine.from_pretrained(model_dir, device="cpu")
    engine.load(mem)
    return {d.id: d.text for d in engine.snapshot().documents()}


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("msa: error:")]
    assert len(errors) == 1, r.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_cli_ingest_ask_info_with_a_tiny_model(tiny_model_dir, tmp_path):
    mem = str(tmp_path / "mem")
    model = ["--model", tiny_model_dir("llama"), "--device", "cpu"]
    files = sorted(glob.glob(os.path.join(DEMO_DOCS, "*.txt")))[:3]
    r = run(model + ["ingest", *files, "--memory", mem])
    assert r.returncode == 0, r.stderr
    assert "ingested 3 files: 3 added, 0 replaced, 0 unchanged" in r.stdout
    r = run(model + ["ingest", *files, "--memory", mem])  # idempotent: nothing to encode
    assert "0 added, 0 replaced, 3 unchanged" in r.stdout, r.stdout + r.stderr
    r = run(model + ["ask", "Who built the lighthouse?", "--memory", mem, "--json", "--max-new-tokens", "3", "-k", "2"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["documents"]) == 2 and set(out["timings"]) >= {"routing_s", "first_token_s", "total_s"}
    r = run(model + ["ask", "Who built the lighthouse?", "--memory", mem, "--json", "--max-new-tokens", "1", "-k", "3",
                     "--rounds", "2", "--no-k-per-round"])
    assert r.returncode == 0, r.stderr
    assert [d["round"] for d in json.loads(r.stdout)["documents"]] == [0, 0, 1]  # k=3 in all: 2 + 1
    r = run(model + ["ask", "Who built the lighthouse?", "--memory", mem, "--json", "--max-new-tokens", "1", "-k", "2",
                     "--rerank", "3"])
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["documents"]) == 2
    r = run(model + ["ask", "Who built the lighthouse?", "--memory", mem, "--json", "--max-new-tokens", "1", "-k", "2",
                     "--rerank", "3", "--rerank-scoring", "path"])
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["documents"]) == 2
    r = run(["info", mem])
    info = json.loads(r.stdout)
    assert info["n_documents"] == 3 and info["fingerprint"]["chunk_size"] == 64


def test_cli_rejects_non_utf8_files_and_adds_nothing(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    r = run(["--model", tiny_model_dir("llama"), "ingest", str(bad), "--memory", str(tmp_path / "m")])
    assert_one_line_error(r, "not UTF-8", "bad.txt")
    assert not os.path.exists(tmp_path / "m" / "manifest.json")


def test_cli_skips_empty_files_by_name_and_takes_hash_in_file_names(tiny_model_dir, tmp_path):
    """An empty file used to fail the whole ingest ('text at position 2 is empty', naming no file), and a file
    named C#-notes.md too (ids may not hold '#'): a file name is not the user's to change."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("Alice paints in Porto.")
    (docs / "C#-notes.md").write_text("C# has classes.")
    (docs / "empty.md").write_text("  \n")
    mem = str(tmp_path / "mem")
    r = run(["--model", tiny_model_dir("llama"), "--device", "cpu", "ingest", str(docs), "--memory", mem,
             "--relative-to", str(docs)])
    assert r.returncode == 0, r.stderr
    assert "ingested 2 files: 2 added" in r.stdout and "skipped 1 empty file(s)" in r.stderr and "empty.md" in r.stderr
    assert saved_documents(tiny_model_dir("llama"), mem) == {"C%23-notes.md": "C# has classes.",
                                                             "a.md": "Alice paints in Porto."}
    r = run(["--model", tiny_model_dir("llama"), "ingest", str(docs / "empty.md"), "--memory", mem])
    assert_one_line_error(r, "empty", "empty.md")


def test_cli_ids_do_not_depend_on_the_working_directory(tiny_model_dir, tmp_path):
    """The same files named relative to two different directories are the same documents."""
    docs = tmp_path / "notes"
    docs.mkdir()
    for name in ("a.txt", "b.md"):
        (docs / name).write_text(f"The note {name} says the sky is blue.")
    mem = str(tmp_path / "mem")
    model = ["--model", tiny_model_dir("llama"), "--device", "cpu"]
    assert run(model + ["ingest", "notes", "--memory", mem], cwd=tmp_path).returncode == 0
    r = run(model + ["ingest", "a.txt", "b.md", "--memory", mem], cwd=docs)
    assert "0 added, 0 replaced, 2 unchanged" in r.stdout, r.stdout + r.stderr
    assert sorted(saved_documents(tiny_model_dir("llama"), mem)) == sorted(
        os.path.realpath(docs / n) for n in ("a.txt", "b.md"))
    # --relative-to: portable ids
    mem2 = str(tmp_path / "mem2")
    assert run(model + ["ingest", str(docs), "--memory", mem2, "--relative-to", str(tmp_path)]).returncode == 0
    assert sorted(saved_documents(tiny_model_dir("llama"), mem2)) == ["notes/a.txt", "notes/b.md"]
    r = run(model + ["ingest", str(docs), "--memory", mem2, "--relative-to", str(docs / "a.txt")])
    assert_one_line_error(r, "--relative-to")


def test_cli_symlink_loops_and_duplicate_links_store_a_file_once(tiny_model_dir, tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "sub" / "note.txt").write_text("Pebble-7's battery lasts nine days.")
    os.symlink(docs, docs / "sub" / "loop")  # a folder link back to its ancestor
    os.symlink(docs / "sub" / "note.txt", docs / "alias.txt")  # a second name for the same file
    mem = str(tmp_path / "mem")
    r = run(["--model", tiny_model_dir("llama"), "--device", "cpu", "ingest", str(docs), str(docs / "alias.txt"),
             "--memory", mem])
    assert r.returncode == 0, r.stderr
    assert "ingested 1 files: 1 added" in r.stdout
    assert list(saved_documents(tiny_model_dir("llama"), mem)) == [os.path.realpath(docs / "sub" / "note.txt")]


def test_cli_reingesting_an_edited_file_replaces_its_text(tiny_model_dir, tmp_path):
    note, other = tmp_path / "note.txt", tmp_path / "other.txt"
    note.write_text("The lighthouse was built by Ada.")
    other.write_text("The bakery opens at six.")
    mem = str(tmp_path / "mem")
    model = ["--model", tiny_model_dir("llama"), "--device", "cpu"]
    assert run(model + ["ingest", str(note), str(other), "--memory", mem]).returncode == 0
    note.write_text("The lighthouse was built by Grace.")
    r = run(model + ["ingest", str(note), str(other), "--memory", mem])
    assert "ingested 2 files: 0 added, 1 replaced, 1 unchanged" in r.stdout, r.stdout + r.stderr
    docs = saved_documents(tiny_model_dir("llama"), mem)
    assert docs == {str(note.resolve()): "The lighthouse was built by Grace.",
                    str(other.resolve()): "The bakery opens at six."}


def test_cli_concurrent_ingests_into_one_memory_keep_every_document(tiny_model_dir, tmp_path):
    """Two `msa ingest` processes on one folder: the writer lock serialises them and each re-reads the
    memory under the lock, so neither loses the other's documents."""
    mem = str(tmp_path / "mem")
    model = ["--model", tiny_model_dir("llama"), "--device", "cpu"]
    groups = []
    for g in range(2):
        folder = tmp_path / f"g{g}"
        folder.mkdir()
        for i in range(3):
            (folder / f"doc{i}.txt").write_text(f"Group {g} document {i}: the answer is {g * 10 + i}.")
        groups.append(folder)
    procs = [start(model + ["ingest", str(folder), "--memory", mem]) for folder in groups]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    docs = saved_documents(tiny_model_dir("llama"), mem)
    assert sorted(docs) == sorted(os.path.realpath(f / f"doc{i}.txt") for f in groups for i in range(3))


def test_cli_os_errors_are_one_line_and_checked_before_encoding(tiny_model_dir, tmp_path, capsys):
    from types import SimpleNamespace

    from msa_plugins.cli import main

    def run_here(args):  # in-process: the same main() as the `msa` script, without a process start each
        rc = main(args)
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out, stderr=err)

    note = tmp_path / "note.txt"
    note.write_text("Some text.")
    # the model does not exist: an error about the destination proves it was checked before loading
    no_model = ["--model", str(tmp_path / "no-such-model"), "--device", "cpu"]
    # one case through a real process: exit status 2 and no traceback
    assert_one_line_error(run(no_model + ["ingest", str(tmp_path / "missing.txt"), "--memory", str(tmp_path / "m")]),
                          "missing.txt", "no such file")
    assert_one_line_error(run_here(no_model + ["ingest", str(tmp_path / "*.pdf"), "--memory", str(tmp_path / "m")]),
                          "no file matches")
    user = tmp_path / "user-folder"
    user.mkdir()
    (user / "docs-2024-budget.md").write_text("the user's own file")
    assert_one_line_error(run_here(no_model + ["ingest", str(note), "--memory", str(user)]), str(user), "no memory")
    assert sorted(os.listdir(user)) == ["docs-2024-budget.md"]  # untouched
    assert_one_line_error(run_here(no_model + ["ingest", str(note), "--memory", str(note / "mem")]), "not a folder")
    assert_one_line_error(run_here(no_model + ["ingest", str(note), "--memory", str(note)]), "not a folder")
    assert_one_line_error(run_here(no_model + ["ask", "What?", "--memory", str(tmp_path / "nowhere")]),
                          "does not exist")
    assert_one_line_error(run_here(["info", str(user)]), "no memory")
    assert_one_line_error(run_here(no_model + ["ingest", str(note), "--memory", str(tmp_path / "m")]),
                          "no-such-model")  # a missing model is an ordinary error too
    assert not os.path.exists(tmp_path / "m")
    # a bad option value is refused by the one validation point, also on the command line
    mem = str(tmp_path / "mem")
    model = ["--model", tiny_model_dir("llama"), "--device", "cpu"]
    assert run_here(model + ["ingest", str(note), "--memory", mem]).returncode == 0
    assert_one_line_error(run_here(model + ["ask", "What?", "--memory", mem, "-k", "0"]), "k must be >= 1")
    assert_one_line_error(run_here(model + ["ask", "What?", "--memory", mem, "--rerank", "-2"]), "rerank must be >= 0")
    assert_one_line_error(run_here(model + ["ask", "What?", "--memory", mem, "--rerank-scoring", "path"]),
                          "add --rerank N")
    assert_one_line_error(run_here(model + ["ask", "x" * 5000, "--memory", mem]), "question", "limit")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_read_only_destination_is_a_one_line_error(tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("Some text.")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = run(["--model", str(tmp_path / "no-such-model"), "ingest", str(note), "--memory", str(ro / "mem")])
        assert_one_line_error(r, "cannot create", str(ro))
    finally:
        ro.chmod(0o755)


def test_demo_data_is_package_data():
    from msa_plugins.cli import demo_data

    docs, questions = demo_data()
    assert len(docs) == 8 and all(name.endswith(".txt") and text.strip() for name, text in docs)
    assert len(questions) == 3 and all(q.endswith("?") for q in questions)


@pytest.mark.slow
def test_default_model_end_to_end(default_engine, tmp_path):
    """Ingest the sample corpus on the real embedded model, ask, get routed documents back (mechanics only:
    a 135M model routing with its own attention is at chance)."""
    e = default_engine
    files = sorted(glob.glob(os.path.join(DEMO_DOCS, "*.txt")))
    ids = e.add([open(f).read() for f in files], ids=[os.path.basename(f) for f in files])
    try:
        res = e.query("Who built the Varnholm Lighthouse?", k=3, max_new_tokens=12)
        assert len(res.documents) == 3 and all(d.id in ids for d in res.documents)
        assert res.answer and res.completion_tokens > 0
        sparse = e.query("Who built the Varnholm Lighthouse?", mode="sparse", k=3, max_new_tokens=4)
        assert len(sparse.per_layer) == len(e.routing_layers)
        e.save(str(tmp_path))
        assert json.load(open(tmp_path / "manifest.json"))["fingerprint"]["model"] == "SmolLM2-135M-Instruct"
    finally:
        e.delete(ids)


# ---------------------------------------------------------------- parser: global options, defaults in --help

@pytest.mark.parametrize("command", [
    ["eval", "--dataset", "popqa"],
    ["ingest", "notes.txt", "--memory", "mem"],
    ["ask", "What?", "--memory", "mem"],
    ["train-router", "--out", "r"],
    ["adapt", "--memory", "mem"],
    ["serve", "--memory", "mem"],
])
def test_global_options_after_the_subcommand_parse_as_before_it(command):
    from msa_plugins.cli import build_parser, merge_global_options

    def parsed(argv):
        parser = build_parser()
        args = parser.parse_args(argv)
        merge_global_options(args, parser)
        return {k: v for k, v in vars(args).items() if k != "fn"}

    options = ["--model", "M", "--router", "R", "--device", "cuda"]
    before = parsed(options + command)
    assert (before["model"], before["router"], before["device"]) == ("M", "R", "cuda")
    assert parsed(command + options) == before
    assert parsed(options[:2] + command + options[2:]) == before  # some before, some after
    assert parsed(options + command + ["--router", "R"]) == before  # the same value twice is fine
    plain = parsed(command)
    assert (plain["model"], plain["router"], plain["device"]) == (None, None, None)


def test_a_global_option_given_twice_with_different_values_is_refused(capsys):
    from msa_plugins.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--router", "A", "eval", "--dataset", "popqa", "--router", "B"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--router is given before the sub-command (A) and after it (B); give it once" in err


def test_eval_device_follows_the_global_default_and_the_options_after_eval(tmp_path, monkeypatch):
    """No --device: run_eval gets None (the engine picks: CUDA when available), not a forced "cpu"."""
    from types import SimpleNamespace

    import msa_plugins.integrations.ragas.ab as ab
    from msa_plugins.cli import main

    calls = []

    def fake_run_eval(**kwargs):
        calls.append(kwargs)
        (tmp_path / "report.md").write_text("report")
        return SimpleNamespace(out_dir=str(tmp_path))

    monkeypatch.setattr(ab, "run_eval", fake_run_eval)
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["eval", "--dataset", "popqa", "--out", str(tmp_path)]) == 0
    assert calls[-1]["device"] is None and calls[-1]["router"] is None
    assert calls[-1]["bank_cache"] == str(tmp_path / "cache" / "eval-banks")
    assert main(["eval", "--dataset", "popqa", "--router", "R", "--device", "cuda", "--no-bank-cache",
                 "--out", str(tmp_path)]) == 0
    assert (calls[-1]["device"], calls[-1]["router"], calls[-1]["bank_cache"]) == ("cuda", "R", None)
    assert main(["eval", "--dataset", "popqa", "--bank-cache", str(tmp_path / "b"), "--out", str(tmp_path)]) == 0
    assert calls[-1]["bank_cache"] == str(tmp_path / "b")


def test_help_shows_defaults(capsys, tmp_path, monkeypatch):
    from msa_plugins.cli import main

    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "c"))

    def help_of(argv):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--help"])
        assert e.value.code == 0
        return " ".join(capsys.readouterr().out.split())  # argparse wraps lines

    text = help_of(["eval"])
    for shown in ("documents per question, both systems (default: 3)", "(default: 24)", "(default: 0)",
                  "(default: rag-minilm,msa)", "(default: 32768)", "(default: single)",
                  "cpu or cuda (default: cuda when available)", "--router ROUTER", "--model MODEL"):
        assert shown in text, shown
    # the bank cache folder this run would use (argparse may break the long path at a hyphen)
    assert f"(default:{tmp_path / 'c' / 'eval-banks'})" in text.replace(" ", "")
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 64)" in help_of(["train-router"])  # --batch-size, an option without help text
    assert "(default: 64)" in help_of(["ask"])  # --max-new-tokens
    assert "(default: cuda when available)" in help_of([])
