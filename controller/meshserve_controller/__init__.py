"""The Kubernetes controller (cluster mode's input side, `meshserve controller`): InferenceServices,
ServingRuntimes, TrafficRules, the storage-config Secret and runtime pools from the Kubernetes
API into the registry, and status back. `watch` is the list/watch loop over the official
`kubernetes` client, `controller` joins it to the store; the pure object mapping it shares with
`meshserve kubectl apply` stays in the kernel (meshserve/k8s/objects.py, rules.py)."""
