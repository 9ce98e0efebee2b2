TORCH_VERSION ?= 2.13.0

.PHONY: install test bench

install:
	pip install "torch==$(TORCH_VERSION)" && pip install -e ".[test]"

test:
	python -m pytest -q

bench:
	python benchmarks/bench_generate_speed.py
	python benchmarks/bench_clip_overhead.py
	python benchmarks/bench_connector_overhead.py
