"""Test servers and harnesses: real meshes, Valkeys, Envoys with an in-process ADS server, storage
servers, a fake Kubernetes API. For tests and benchmarks only: the product never imports this
package and the wheel does not ship it (pyproject.toml: pytest's `pythonpath` puts testing/ on
sys.path; bench/__init__.py does the same for `python -m bench...`)."""
