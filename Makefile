# `make demo` and `make test` each do the whole set-up on a fresh machine, then run.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist

.PHONY: setup test demo models clean

$(STAMP): pyproject.toml
	@if [ ! -d $(FMNIST) ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist; \
	fi
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	# deepforest ships real aerial tree photos with boxes; its dependencies are not wanted (data only).
	$(VENV)/bin/pip install -q --no-deps deepforest==2.1.0
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q -n 2

demo: setup
	rm -rf runs/demo  # the previous demo's runs; cspnet compare refuses to train over trained runs
	$(PY) -m cspnet compare --out runs/demo
	@echo "report: runs/demo/report.md"

models: setup
	$(PY) -m cspnet models --out docs/models.md --readme README.md > /dev/null

clean:
	rm -rf $(VENV) build src/*.egg-info
