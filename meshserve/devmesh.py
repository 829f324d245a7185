"""Kept only for meshserve_loader (process.start_mlserver, measure), which still imports its port
helpers from here. The test meshes moved to the testing package (testing/meshserve_testing);
remove this file once the loader imports meshserve.ports instead."""

from meshserve.ports import reserve_block as free_block, reserve_port as free_port

__all__ = ["free_block", "free_port"]
