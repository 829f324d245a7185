"""The request headers ModelMesh's clients send and every hop reads: defined once here.

`mm-vmodel-id` names an InferenceService (a virtual model, resolved through its alias);
`mm-model-id` names a concrete model id and bypasses aliases and traffic rules. gRPC clients
must send one of them; REST requests name the model in the path and Envoy adds them."""

MODEL_ID_HEADER = "mm-model-id"
VMODEL_ID_HEADER = "mm-vmodel-id"

# Sent by the activator with a cold request it forwards while the model's load is still under
# way on that pod: the runtime holds the request until the load ends, for at most this many
# seconds, instead of the activator waiting for the load's result to come round through Redis
# first (docs/design/placement.md "Sent ahead of the load"). Only runtimes whose pods declare
# it (Pod.awaits_loads: the built-in) get it.
AWAIT_LOAD_HEADER = "ms-await-load"
