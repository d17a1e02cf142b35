# `make demo`: set up .venv on first use, train FastCLIP-v3 on the digits demo on 2 CPU ranks with the deepspeed
# launcher, export to open_clip and score the export zero-shot (`make demo LOSS=openclip` for the baseline).
# `make test`: set up and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned on the same pip command line as the package, so nothing resolves to a CUDA torch (see README).
CPU_PINS := torch==2.13.0 torchvision==0.28.0 triton==3.8.0
RUN_DIR ?= runs/digits-demo
RANKS ?= 2
LOSS ?= fastclip_v3
# fastclip_v3 runs the published code's update (loss.tau_grad=fastclip_code, the default) with GCL's feature-gradient
# scale: --multiply_tau's τ≈0.07 factor is damped by AdamW's ε = 1e-6 here (top-1 0.69 with it, 0.85 without;
# docs/RESULTS.md §1).
DEMO_SET ?= $(if $(filter fastclip_v3,$(LOSS)),--set loss.multiply_tau=false)
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test lint bench clean

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --progress-bar off $(CPU_PINS) -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	@echo "make demo: training $(LOSS) (--set loss.name=$(LOSS) $(DEMO_SET)) on the digits demo, $(RANKS) CPU ranks"
	PATH=$(abspath $(VENV))/bin:$$PATH bash launchers/local_deepspeed.sh $(RANKS) --set loss.name=$(LOSS) $(DEMO_SET) \
	    --set train.output_dir=$(RUN_DIR) --deepspeed_config ds_configs/cpu_zero2_fp32.json
	$(VENV)/bin/fastclip-ds export $(RUN_DIR) --out $(RUN_DIR)/model.pt
	@echo "make demo: zero-shot eval of the exported $(LOSS) model ($(RUN_DIR)/model.pt)"
	$(VENV)/bin/fastclip-ds eval --checkpoint $(RUN_DIR)/model.pt --model-config $(RUN_DIR)/model.json \
	    --data $$($(PY) -c 'from fastclip_ds import digits; print(digits.eval_root(digits.DEFAULT_ROOT))')

test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed
	$(VENV)/bin/fastclip-ds bench --device cpu --batch 8192 --dim 512 --impl chunked,openclip \
	    --csv kernels/bench_cpu.csv --plot kernels/bench_cpu.png --markdown kernels/bench_cpu.md

clean:
	rm -rf $(VENV) runs
