"""Traffic rules: the TrafficRule resource (schema.py), what it means for routing (plan.py) and
where it lives in Redis (store.py). Design notes: docs/design/traffic.md."""
