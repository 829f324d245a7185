"""The seed's custom MLServer runtime, with a small offline model standing in for bloomz.

The seed's class inherits MLServer's MLModel and answers `predict(content: List[str]) ->
List[str]` through `@decode_args`: BYTES in, BYTES out with `content_type: str`. It prompts
bloomz-560m (prompt-tuned with PEFT on the Twitter complaints set) with
"Tweet text : <text> Label : " and returns the generated text. No weights can be downloaded
here, so this one labels the tweet with all-MiniLM-L6-v2 sentence embeddings (offline, numpy:
`minilm_numpy.py`, weights from the model's storage): the label whose description the text is
closest to. The answer keeps the seed's form: "Tweet text : <text> Label : <label>".
"""

from __future__ import annotations

import os
from typing import List

import numpy as np
from mlserver import MLModel
from mlserver.codecs import decode_args

from minilm_numpy import MiniLMEmbedder

LABELS = {
    "complaint": "I am angry and unhappy: the service was terrible, my order is late and nobody helps me.",
    "no complaint": "What a lovely day, I feel happy, grateful and full of hope.",
}


class PeftModelServer(MLModel):
    async def load(self) -> bool:
        # The seed reads its base model from PRETRAINED_MODEL_PATH; here the model's storage
        # (parameters.uri, the folder the loader pulled) holds the weights, and the env var wins.
        uri = os.environ.get("PRETRAINED_MODEL_PATH") or self.settings.parameters.uri
        self.encoder = MiniLMEmbedder({"parameters": {"uri": uri}})
        self.encoder.load()
        self.text_column = os.environ.get("DATASET_TEXT_COLUMN_NAME", "Tweet text")
        self.labels = list(LABELS)
        self.label_vectors = self.encoder.embed(list(LABELS.values()))
        self.ready = True
        return self.ready

    @decode_args
    async def predict(self, content: List[str]) -> List[str]:
        return self._predict_outputs(content)

    def _predict_outputs(self, content: List[str]) -> List[str]:
        scores = self.encoder.embed(list(content)) @ self.label_vectors.T
        return [f"{self.text_column} : {text} Label : {self.labels[int(np.argmax(s))]}" for text, s in zip(content, scores)]
