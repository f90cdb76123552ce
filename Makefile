# genpipe — `make demo` and `make test` each create .venv when missing and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.genpipe-installed

.PHONY: demo test test-all lint install bench bench-scale bench-gpu bench-gpu-rehearsal device-kit clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml; constraints.txt pins the rest to a set
# of versions known to work together.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/genpipe demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Benchmarks (benchmarks/README.md): each merges its section into $(BENCH_JSON) and prints markdown tables.
# `bench`: throughput (bare diffusers loop vs genpipe: scoring off/on, batch-invariant, Ray 1 vs 2 actors), manifest
# planning on 20k rows and audit writes (SQLite, and PostgreSQL on 127.0.0.1:5432 when one answers); 7-8
# minutes on a lightly loaded 2-core machine. `bench-scale`: the 1,000,000-row manifest (about 6 minutes).
# `bench-gpu`: an SDXL-size model on CUDA with MFU (exits at once without a GPU); `bench-gpu-rehearsal`: the same
# code path on the CPU with SDXL's architecture at toy widths (seconds); `device-kit`: the wheels a lent GPU
# machine lacks, for benchmarks/device_run.sh (benchmarks/README.md, "GPU mode").
BENCH_JSON ?= benchmarks/results.json
BENCH_ENV  := HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

bench: $(STAMP)
	$(BENCH_ENV) $(PY) -m benchmarks.throughput --repeat 3 --json $(BENCH_JSON) --md benchmarks/results-throughput.md
	$(BENCH_ENV) $(PY) -m benchmarks.manifest_scale --rows 20000 --modes dry,validate_cli,run_dry_cli,plan_noscreen,plan \
		--json $(BENCH_JSON) --md benchmarks/results-manifest.md
	$(BENCH_ENV) $(PY) -m benchmarks.audit_writes --verify --json $(BENCH_JSON) --md benchmarks/results-audit.md

bench-scale: $(STAMP)
	$(BENCH_ENV) $(PY) -m benchmarks.manifest_scale --rows 1000000 --tag 1m --json $(BENCH_JSON) \
		--md benchmarks/results-manifest-1m.md

bench-gpu: $(STAMP)
	$(BENCH_ENV) $(PY) -m benchmarks.gpu --json benchmarks/results-gpu.json --md benchmarks/results-gpu.md

bench-gpu-rehearsal: $(STAMP)
	$(BENCH_ENV) $(PY) -m benchmarks.gpu --device cpu --arch sdxl-tiny -n 8 --width 64 --height 64 --steps 4 \
		--clip-arch tiny --json /tmp/genpipe-gpu-rehearsal.json --md /tmp/genpipe-gpu-rehearsal.md

device-kit: $(STAMP)
	$(PY) -m benchmarks.device_kit

clean:
	rm -rf runs .pytest_cache
