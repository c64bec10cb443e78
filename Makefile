# Two commands for a newcomer: `make demo` and `make test`. Both create/refresh .venv first (`make .venv` does only
# that): qatkit with all extras, at the exact versions pinned in constraints.txt (pyproject.toml declares ranges).
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.qatkit-installed
# Rockchip's rknn-toolkit2 pins numpy 1.26 / onnx 1.18: its own environment, which qatkit drives in a subprocess
RKNN_VENV := .venv-rknn
RKNN_STAMP := $(RKNN_VENV)/.qatkit-installed
# OpenMP threads that spin-wait collapse throughput when two processes share the 2 cores.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: .venv .venv-rknn demo test bench default-yolo clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[all]"
	@touch $(STAMP)

.venv: $(STAMP)

$(RKNN_STAMP): $(STAMP) src/qatkit/targets/rknn_env.py
	$(VENV)/bin/qatkit targets install rknn --venv $(RKNN_VENV)
	@touch $(RKNN_STAMP)

.venv-rknn: $(RKNN_STAMP)

demo: $(STAMP)
	$(VENV)/bin/qatkit demo

# the suite drives the real rknn-toolkit2 too (tests/test_rknn.py), in .venv-rknn
test: $(STAMP) $(RKNN_STAMP)
	QATKIT_RKNN_PYTHON=$(CURDIR)/$(RKNN_VENV)/bin/python $(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/run.py
	$(VENV)/bin/python benchmarks/speed.py
	$(VENV)/bin/python benchmarks/ort_vs_quantize_static.py
	$(VENV)/bin/python benchmarks/fake_quant_kernels.py
	$(VENV)/bin/python benchmarks/step_time.py
	$(VENV)/bin/python benchmarks/dispatch_cost.py
	$(VENV)/bin/python benchmarks/bias_correction.py
	$(VENV)/bin/python benchmarks/calibration.py --methods max,mse
	$(VENV)/bin/python benchmarks/ultralytics_qat.py

# re-trains `qatkit run`'s default YOLO11n on the generated clutter set (CPU: about 65 min on 2 cores)
default-yolo: $(STAMP)
	$(VENV)/bin/python scripts/train_default_yolo.py

clean:
	rm -rf runs .pytest_cache
