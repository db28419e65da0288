# The front-door commands (see README.md): demo, test (the static gate, then the whole suite), bench.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
PY := .venv/bin/python

.PHONY: setup demo lint test bench
setup:
	bash infra/setup.sh

demo: setup
	$(PY) -m jobs.label --config jobs/configs/demo.yaml

# The static gate: lint, formatting and types (config in pyproject.toml).
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: setup lint
	bash infra/test-deps.sh
	$(PY) -m pytest -q -ra

bench: setup
	$(PY) bench/bench_embed.py
	$(PY) bench/bench_embed.py --prompt-sharing
	$(PY) bench/bench_job.py
	$(PY) bench/bench_reward_models.py
