"""The built-in runtime: a KServe v2 server (REST and gRPC) holding many models in one process."""
