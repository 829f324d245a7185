"""The loader agent and the built-in runtime that run in every runtime pod."""
