"""The rollout controller: InferenceService version moves and progressive canaries
(docs/design/traffic.md). One leader at a time, through the store's Lease."""
