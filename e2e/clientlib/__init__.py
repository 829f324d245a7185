"""The clients ModelMesh users bring (tritonclient, the kserve SDK), run from a venv of their own:
they pin protobuf 6 and we use 7, so they can't share ours (as with MLServer). Test-only."""
