"""The meshserve xDS control plane: pure resource building, a snapshot cache, and a thin ADS server.

This package is named meshserve_xds, never `xds`: xds-protos installs a top-level `xds`
package that Envoy's generated code imports.
"""
