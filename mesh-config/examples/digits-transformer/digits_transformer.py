"""A KServe transformer in front of a mesh predictor: an 8x8 grey image sent as nested lists
becomes the 64 features the digits model (sklearn-mnist's SVM) takes.

KServe's pattern: a kserve.Model subclass whose preprocess builds the predictor's request and
whose postprocess shapes its answer; kserve.ModelServer runs it, and Model.predict calls the
predictor at --predictor_host (here the mesh gateway) under the model's own name.
"""

from __future__ import annotations

import argparse
from typing import Dict, Union

import kserve
import numpy as np
from kserve import InferInput, InferRequest, InferResponse


class DigitsTransformer(kserve.Model):
    def __init__(self, name: str, predictor_host: str, protocol: str = "v2"):
        super().__init__(name, kserve.model.PredictorConfig(predictor_host, protocol))
        self.ready = True

    def preprocess(self, payload: Union[Dict, InferRequest], headers: Dict[str, str] = None) -> InferRequest:
        if isinstance(payload, InferRequest):
            images = [np.asarray(i.data, dtype=np.float32) for i in payload.inputs]
        else:  # v1 {"instances": [8x8, ...]}
            images = [np.asarray(payload["instances"], dtype=np.float32)]
        features = np.concatenate([im.reshape(-1, 64) for im in images])  # each 8x8 image -> one row of 64
        inp = InferInput(name="predict", shape=list(features.shape), datatype="FP32")
        inp.set_data_from_numpy(features, binary_data=False)
        return InferRequest(model_name=self.name, infer_inputs=[inp], request_id=getattr(payload, "id", None))

    def postprocess(self, response: Union[Dict, InferResponse], headers: Dict[str, str] = None,
                    response_headers: Dict[str, str] = None) -> Union[Dict, InferResponse]:
        return response  # the predictor's answer (the digit) as it is


parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
args, _ = parser.parse_known_args()

if __name__ == "__main__":
    model = DigitsTransformer(args.model_name, predictor_host=args.predictor_host, protocol=args.predictor_protocol)
    kserve.ModelServer().start([model])
