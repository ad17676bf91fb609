# Two commands do all set-up on a fresh machine:
#   make demo   venv + install + the main job on the embedded digits data
#   make test   venv + install + the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,onnx,timm]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m compressor prune --model vgg16_bn --rates experiments/vgg16_bn_digits/demo.yaml \
		--reconstruct --out checkpoints/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/bench_rank.py

clean:
	rm -rf $(VENV) *.egg-info
