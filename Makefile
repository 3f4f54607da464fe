# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`  (`make test-fast`: unit tests only).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat requirements/cpu.txt pyproject.toml | md5sum | cut -c1-12)
# Extra pytest arguments, e.g. TEST_ARGS="-k prepare --durations=20".
TEST_ARGS ?=
# The fast tier: tests that start no process and use no network (tests/conftest.py adds the markers); one
# torch thread (tiny models: a second thread buys little and costs much on a busy machine).
FAST    := not slow and not dist and not slurm

.PHONY: venv demo test test-fast clean

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

test-fast: venv
	$(BIN)/python -c "from pretrain.data.demo_corpus import ensure_demo_corpus; ensure_demo_corpus()"
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -m "$(FAST)" $(TEST_ARGS)

clean:
	rm -rf runs/demo .pytest_cache
