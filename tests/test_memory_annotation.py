"""Issue 19 §2: an InferenceService or Predictor states its memory with the `meshserve.io/memory`
annotation (Kubernetes quantity syntax); a bad value is a file:line: field: reason error at apply.

Kind: unit (pure: YAML text to ModelSpec).
"""

from __future__ import annotations

import pytest

from meshserve import registry
from meshserve.yamlfile import ConfigError, load_documents

ISVC = """\
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: mnist
  annotations:
    serving.kserve.io/deploymentMode: ModelMesh
    meshserve.io/memory: {value}
spec:
  predictor:
    model:
      modelFormat: {{name: sklearn}}
      storage: {{key: localMinIO, path: sklearn/mnist-svm.joblib}}
"""

PREDICTOR = """\
apiVersion: serving.kserve.io/v1alpha1
kind: Predictor
metadata:
  name: mnist
  annotations:
    meshserve.io/memory: {value}
spec:
  modelType: {{name: sklearn}}
  path: sklearn/mnist-svm.joblib
  storage: {{s3: {{secretKey: localMinIO}}}}
"""


def _parse(text: str) -> "registry.ModelSpec":
    (doc,) = load_documents("models.yaml", text)
    return registry.parse_model(doc)


@pytest.mark.parametrize("template", [ISVC, PREDICTOR], ids=["InferenceService", "Predictor"])
@pytest.mark.parametrize("value,size", [
    ("512Mi", 512 << 20), ("2Gi", 2 << 30), ('"300M"', 300_000_000), ("1.5Ki", 1536), ("1e6", 1_000_000),
    ("4096", 4096), ('"100m"', 1),  # a milli-byte rounds up: a booking must cover it
])
def test_memory_is_a_kubernetes_quantity(template: str, value: str, size: int) -> None:
    assert _parse(template.format(value=value)).size_hint == size


@pytest.mark.parametrize("template", [ISVC, PREDICTOR], ids=["InferenceService", "Predictor"])
def test_the_annotation_does_not_change_the_model_id(template: str) -> None:
    # Stating a size is not a new version of the model: its id (and so its copies) stay.
    (doc,) = load_documents("models.yaml", template.format(value="1Gi").replace("    meshserve.io/memory: 1Gi\n", ""))
    plain = registry.parse_model(doc)
    assert plain.size_hint == 0
    assert _parse(template.format(value="1Gi")).id == plain.id


@pytest.mark.parametrize("template", [ISVC, PREDICTOR], ids=["InferenceService", "Predictor"])
@pytest.mark.parametrize("value,reason", [
    ("lots", "'lots' is not a memory quantity; write e.g. 512Mi"),
    ("512MB", "'512MB' is not a memory quantity"),
    ("-1Gi", "'-1Gi': must be more than 0 bytes"),
    ("0", "must be more than 0 bytes"),
    ("[1, 2]", "must be a memory quantity such as 512Mi"),
    ("true", "must be a memory quantity such as 512Mi"),
])
def test_a_bad_memory_value_names_file_line_and_field(template: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        _parse(template.format(value=value))
    line = 6 if template is PREDICTOR else 7
    assert str(e.value).startswith(f"models.yaml:{line}: metadata.annotations.meshserve.io/memory: "), str(e.value)
    assert reason in e.value.message
