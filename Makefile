# Two entry points for a fresh machine with Python 3.11: `make up` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test proto bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/meshserve up

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

proto: install
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --grpc_python_out=proto proto/meshserve_proto/grpc_predict_v2.proto

bench: install
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .meshserve
