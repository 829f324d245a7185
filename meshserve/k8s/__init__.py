"""Cluster mode: the control plane's inputs come from the Kubernetes API instead of mesh-config/.

`objects` is pure (API objects in, registry input and status out), `watch` is the list/watch
loop over the official `kubernetes` client, and `controller` joins them to the Redis state.
"""
