# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat requirements/cpu.txt pyproject.toml | md5sum | cut -c1-12)
# Number of pytest workers; distributed tests start their own processes, so keep it small on 2 cores.
TEST_ARGS ?=

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): requirements/cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/cpu.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m pretrain.evals.lm_eval_plugin install  # `lm_eval --model pretrain` (lm-eval has no plugin discovery)
	rm -f $(VENV)/.installed-* && touch $@

demo: venv
	$(BIN)/pretrain demo

test: venv
	$(BIN)/python -m pytest $(TEST_ARGS)

clean:
	rm -rf runs/demo .pytest_cache
