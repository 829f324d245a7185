"""The request headers ModelMesh's clients send and every hop reads: defined once here.

`mm-vmodel-id` names an InferenceService (a virtual model, resolved through its alias);
`mm-model-id` names a concrete model id and bypasses aliases and traffic rules. gRPC clients
must send one of them; REST requests name the model in the path and Envoy adds them."""

MODEL_ID_HEADER = "mm-model-id"
VMODEL_ID_HEADER = "mm-vmodel-id"
