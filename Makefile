# Two entry points for a fresh machine with Python 3.11: `make up` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test proto locks bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Every extra (all) and the test tools: `make up` runs every role on this machine.
	$(BIN)/pip install -q -e '.[all,test]'
	# xds-protos ships a stale copy of opentelemetry-proto's files (grpc/grpc#42926): whichever
	# installs last wins, and the old copy breaks the OTLP exporter. Put the real one back.
	$(BIN)/pip install -q --no-deps --force-reinstall "opentelemetry-proto==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/meshserve up

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The generator runs in a throwaway environment of its own (uv): its version, pinned in
# pyproject.toml [tool.meshserve], sets the grpcio/protobuf minimums its code accepts.
PROTO_GENERATOR = $(shell $(PY) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["tool"]["meshserve"]["proto-generator"])')

proto: install
	$(BIN)/uv run --no-project --isolated -q -p $(PY) --with '$(PROTO_GENERATOR)' python -m grpc_tools.protoc -I proto --python_out=proto --grpc_python_out=proto proto/meshserve_proto/*.proto

# The images' lock files (docker/Dockerfile): each role's extra, every version pinned with hashes,
# for the images' platform. --upgrade: resolve anew rather than keep the old file's pins.
LOCK = $(BIN)/uv pip compile -q --upgrade pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_36 \
	--generate-hashes --no-emit-package meshserve --custom-compile-command "make locks"

locks: install
	$(LOCK) --extra control -o docker/lock/control-plane.txt
	$(LOCK) --extra loader -o docker/lock/loader.txt
	$(LOCK) --extra runtime -o docker/lock/runtime.txt
	$(LOCK) --extra all -o docker/lock/dev.txt

bench: install
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .meshserve
