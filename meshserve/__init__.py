"""meshserve: a model service mesh. This package holds what every component shares:
plain data types, the Redis state schema, settings, and the CLI."""

__version__ = "0.1.0"
