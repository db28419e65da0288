# The two front-door commands (see README.md).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
PY := .venv/bin/python

.PHONY: setup demo test bench
setup:
	bash infra/setup.sh

demo: setup
	$(PY) -m jobs.label --config jobs/configs/demo.yaml

test: setup
	bash infra/test-deps.sh
	$(PY) -m pytest -q -ra

bench: setup
	$(PY) bench/bench_embed.py
	$(PY) bench/bench_embed.py --prompt-sharing
	$(PY) bench/bench_job.py
