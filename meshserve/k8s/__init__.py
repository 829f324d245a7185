"""Cluster mode's shared, pure part: Kubernetes API objects in, registry input and status out
(`objects`, `rules`), used by the controller (controller/meshserve_controller) and by
`meshserve kubectl apply` (`cliapply`).
"""
