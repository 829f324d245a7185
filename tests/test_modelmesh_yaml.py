"""Kind: unit (pure). What a ModelMesh user brings, parsed as meshserve reads it: Predictors
(serving.kserve.io/v1alpha1), the legacy `spec.predictor.<framework>` form, the secretKey and
schemaPath annotations, the model-serving-config ConfigMap, and a kind meshserve does not
handle. Errors name file, line and field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from meshserve import registry, servingconfig
from meshserve.rules.config import read_config
from meshserve.yamlfile import ConfigError, load_documents

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
EXAMPLES = SHARED / "fixtures" / "modelmesh-examples"
needs_shared = pytest.mark.skipif(not EXAMPLES.exists(), reason="needs ../shared/fixtures/modelmesh-examples beside the repository")


def _write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


@needs_shared
def test_modelmesh_examples_parse_as_isvc_and_predictor() -> None:
    """The four example InferenceServices and the four Predictors of the same models give the
    same model: format, storage key and path. Concrete ids follow ModelMesh's sources."""
    cfg = read_config([EXAMPLES / "isvcs"])
    pcfg = read_config([EXAMPLES / "predictors"])
    isvcs = {s.alias: s for s in cfg.specs}
    preds = {s.alias: s for s in pcfg.specs}
    assert set(isvcs) == set(preds) == {"example-lightgbm-mushroom", "example-sklearn-mnist-svm", "example-onnx-mnist", "example-xgboost-mushroom"}
    for alias, p in preds.items():
        i = isvcs[alias]
        assert (p.format, p.storage) == (i.format, i.storage)
        assert p.storage["key"] == "localMinIO"
        assert re.fullmatch(rf"{alias}__ksp-[0-9a-f]{{10}}", p.id) and re.fullmatch(rf"{alias}__isvc-[0-9a-f]{{10}}", i.id)
    assert set(pcfg.kinds.values()) == {"Predictor"}


@needs_shared
def test_predictor_schema_agrees_with_modelmesh_crd() -> None:
    """meshserve's Predictor schema accepts what ModelMesh's CRD accepts for the examples, and
    both refuse a Predictor without modelType."""
    import jsonschema

    crd = yaml.safe_load((SHARED / "schemas" / "modelmesh-predictors-crd.yaml").read_text())
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for f in sorted((EXAMPLES / "predictors").glob("*.yaml")):
        spec = yaml.safe_load(f.read_text())["spec"]
        jsonschema.validate(spec, spec_schema)
        jsonschema.validate(spec, registry.PREDICTOR_SPEC_SCHEMA)
    for schema in (spec_schema, registry.PREDICTOR_SPEC_SCHEMA):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"path": "x"}, schema)


PREDICTOR = """apiVersion: serving.kserve.io/v1alpha1
kind: Predictor
metadata:
  name: p
spec:
  modelType:
    name: sklearn
    version: "1"
  runtime:
    name: mlserver-1.x
  path: sklearn/mnist-svm.joblib
  schemaPath: schema/s.json
  storage:
    s3:
      secretKey: localMinIO
      bucket: other-bucket
"""


def test_predictor_fields(tmp_path: Path) -> None:
    (spec,) = read_config([_write(tmp_path, PREDICTOR)]).specs
    assert (spec.format, spec.format_version, spec.runtime) == ("sklearn", "1", "mlserver-1.x")
    assert spec.storage == {"path": "sklearn/mnist-svm.joblib", "key": "localMinIO", "parameters": {"bucket": "other-bucket"}, "schemaPath": "schema/s.json"}
    pvc = PREDICTOR.replace("    s3:\n      secretKey: localMinIO\n      bucket: other-bucket\n", "    persistentVolumeClaim:\n      claimName: my-models-pvc\n")
    (spec,) = read_config([_write(tmp_path, pvc)]).specs
    assert spec.storage["parameters"] == {"type": "pvc", "name": "my-models-pvc"} and "key" not in spec.storage
    # The newer StorageSpec fields, with storage.path winning over the deprecated spec.path.
    newer = PREDICTOR.replace("    s3:\n      secretKey: localMinIO\n      bucket: other-bucket\n", "    key: gcs\n    path: m/v2\n    parameters: {bucket: b}\n")
    (spec,) = read_config([_write(tmp_path, newer)]).specs
    assert spec.storage == {"path": "m/v2", "key": "gcs", "parameters": {"bucket": "b"}, "schemaPath": "schema/s.json"}


@pytest.mark.parametrize("edit, line, field, reason", [
    (("  modelType:\n    name: sklearn\n    version: \"1\"\n", ""), 5, "spec.modelType", "required"),
    (("    name: sklearn\n", "    name: 7\n"), 7, "spec.modelType.name", "is not of type 'string'"),
    (("      secretKey: localMinIO\n", ""), 14, "spec.storage.s3.secretKey", "required"),
    (("  path: sklearn/mnist-svm.joblib\n", ""), 5, "spec.path", "required"),
    (("serving.kserve.io/v1alpha1", "serving.kserve.io/v1beta1"), 1, "apiVersion", "expected serving.kserve.io/v1alpha1"),
])
def test_predictor_errors_name_file_line_field(tmp_path: Path, edit: tuple[str, str], line: int, field: str, reason: str) -> None:
    f = _write(tmp_path, PREDICTOR.replace(*edit))
    with pytest.raises(ConfigError) as e:
        read_config([f])
    assert (e.value.file, e.value.line, e.value.field) == (str(f), line, field), str(e.value)
    assert reason in e.value.message


LEGACY = """apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: example-sklearn-isvc
  annotations:
    serving.kserve.io/deploymentMode: ModelMesh
    serving.kserve.io/secretKey: localMinIO
spec:
  predictor:
    sklearn:
      storageUri: s3://modelmesh-example-models/sklearn/mnist-svm.joblib
"""


def test_legacy_framework_form_with_secret_key_annotation(tmp_path: Path) -> None:
    """ModelMesh's own quickstart: predictor.sklearn.storageUri plus the secretKey annotation.
    The format is the framework; the annotation picks the storage-config key, so the loader
    needs no `default` key."""
    (spec,) = read_config([_write(tmp_path, LEGACY)]).specs
    assert spec.format == "sklearn"
    assert spec.storage == {"uri": "s3://modelmesh-example-models/sklearn/mnist-svm.joblib", "key": "localMinIO"}
    assert spec.id.startswith("example-sklearn-isvc__isvc-")
    # The annotation is part of the model: another key is another concrete model.
    other = read_config([_write(tmp_path, LEGACY.replace("secretKey: localMinIO", "secretKey: other"))]).specs[0]
    assert other.id != spec.id and other.storage["key"] == "other"


def test_loader_plans_the_annotated_uri_without_a_default_key() -> None:
    """The loader's planning (pure) picks the annotated store: the fix for "the storage-config
    has no 'default' key"."""
    from meshserve_loader.fetch import plan_source
    from meshserve_loader.storage_config import parse_store

    store = parse_store("localMinIO", json.dumps({"type": "s3", "endpoint_url": "http://minio:9000", "bucket": "modelmesh-example-models"}))
    (doc,) = load_documents("m.yaml", LEGACY)
    src = plan_source(registry.parse_model(doc).storage, {"localMinIO": store})
    assert (src.kind, src.store, src.bucket, src.key) == ("s3", store, "modelmesh-example-models", "sklearn/mnist-svm.joblib")


def test_schema_path_annotation_and_storage_key_precedence(tmp_path: Path) -> None:
    text = LEGACY.replace("    serving.kserve.io/secretKey: localMinIO\n", "    serving.kserve.io/secretKey: localMinIO\n    serving.kserve.io/schemaPath: schemas/mnist.json\n")
    (spec,) = read_config([_write(tmp_path, text)]).specs
    assert spec.storage["schemaPath"] == "schemas/mnist.json"
    # storage.key wins over the annotation, as in ModelMesh's processInferenceServiceStorage.
    keyed = text.replace("      storageUri:", "      storage: {key: explicit}\n      storageUri:")
    (spec,) = read_config([_write(tmp_path, keyed)]).specs
    assert spec.storage["key"] == "explicit"
    # A model spec without those annotations keeps the id it always had.
    plain = LEGACY.replace("    serving.kserve.io/secretKey: localMinIO\n", "")
    (doc,) = load_documents("m.yaml", plain)
    assert registry.parse_model(doc).id == registry.concrete_model_id("example-sklearn-isvc", doc.data["spec"]["predictor"])


def test_legacy_form_errors(tmp_path: Path) -> None:
    two = LEGACY + "    xgboost:\n      storageUri: s3://b/x.json\n"
    with pytest.raises(ConfigError) as e:
        read_config([_write(tmp_path, two)])
    assert (e.value.line, e.value.field) == (12, "spec.predictor.xgboost") and "one framework per predictor" in e.value.message
    none = LEGACY.replace("    sklearn:\n      storageUri: s3://modelmesh-example-models/sklearn/mnist-svm.joblib\n", "    minReplicas: 1\n")
    with pytest.raises(ConfigError) as e:
        read_config([_write(tmp_path, none)])
    assert e.value.field == "spec.predictor.model" and "a framework field (sklearn" in e.value.message
    both = LEGACY.replace("      storageUri:", "      storage: {path: a/b}\n      storageUri:")
    with pytest.raises(ConfigError, match=r"m.yaml:11: spec.predictor.sklearn.storage.path: cannot be used together with storageUri"):
        read_config([_write(tmp_path, both)])


@pytest.mark.parametrize("doc, line, field, what", [
    ("apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: my-models-pvc\n", 2, "kind", "does not handle kind PersistentVolumeClaim (v1)"),
    ("apiVersion: serving.kserve.io/v1alpha1\nkind: TrainedModel\nmetadata:\n  name: t\n", 2, "kind", "does not handle kind TrainedModel"),
    ("apiVersion: v1\nkind: Secret\nmetadata:\n  name: other\n", 4, "metadata.name", "Secret/other: meshserve reads no Secret of that name (only storage-config)"),
    ("apiVersion: v1\nmetadata:\n  name: x\n", 1, "kind", "every document needs a kind"),
])
def test_unhandled_kind_is_an_error_naming_it(tmp_path: Path, doc: str, line: int, field: str, what: str) -> None:
    f = _write(tmp_path, LEGACY + "---\n" + doc)
    with pytest.raises(ConfigError) as e:
        read_config([f])
    assert (e.value.line, e.value.field) == (12 + line, field), str(e.value)
    assert what in e.value.message and "kubectl" in e.value.message or "needs a kind" in e.value.message


@needs_shared
def test_handled_other_kinds_are_noted_not_refused(tmp_path: Path) -> None:
    cfg = read_config([SHARED / "fixtures" / "servingruntime-triton.yaml", EXAMPLES / "storage-config.yaml"])
    assert cfg.specs == [] and len(cfg.skipped) == 2
    assert "ServingRuntime/" in cfg.skipped[0] and "Secret/storage-config: read by the loaders" in cfg.skipped[1]


SERVING_CONFIG = """apiVersion: v1
kind: ConfigMap
metadata:
  name: model-serving-config
data:
  config.yaml: |
    podsPerRuntime: 3
    scaleToZero:
      enabled: false
      gracePeriodSeconds: 5
    grpcMaxMessageSizeBytes: 16777216
    restProxy:
      enabled: true
      port: 8118
    metrics:
      enabled: true
    builtInServerTypes: [mlserver, triton]
    headlessService: false
    storageHelperResources:
      requests:
        cpu: 50m
    modelMeshImage:
      name: kserve/modelmesh
"""


def test_model_serving_config_maps_keys_and_warns_once_per_other_key(tmp_path: Path) -> None:
    cfg = read_config([_write(tmp_path, SERVING_CONFIG)])
    sc = cfg.serving
    assert sc is not None and cfg.specs == []
    assert sc.settings == {"pods": 3, "gateway_rest_port": 8118}
    assert (sc.scale_to_zero, sc.scale_grace_seconds, sc.pool_replicas, sc.server_types) == (False, 5.0, 3, frozenset({"mlserver", "triton"}))
    f = str(tmp_path / "m.yaml")
    assert sc.warnings == [
        f"{f}:18: config.yaml: headlessService: ignored: meshserve has no setting for this ModelMesh key",
        f"{f}:22: config.yaml: modelMeshImage: ignored: meshserve has no setting for this ModelMesh key",
        f"{f}:19: config.yaml: storageHelperResources: ignored: sets the loader container's resources: "
        "edit them in istio/runtime-builtin.yaml and runtime-mlserver.yaml (container `loader`)",
    ]
    assert cfg.warnings == sc.warnings


def test_model_serving_config_values_meshserve_cannot_meet_warn(tmp_path: Path) -> None:
    text = SERVING_CONFIG.replace("grpcMaxMessageSizeBytes: 16777216", "grpcMaxMessageSizeBytes: 134217728").replace(
        "enabled: true\n      port", "enabled: false\n      port").replace("metrics:\n      enabled: true", "metrics:\n      enabled: false")
    warnings = read_config([_write(tmp_path, text)]).warnings
    assert any("grpcMaxMessageSizeBytes: ignored: asks for 134217728 bytes" in w for w in warnings)
    assert any("restProxy.enabled: ignored: is false, but meshserve's gateway always serves REST" in w for w in warnings)
    assert any("metrics.enabled: ignored: is false" in w for w in warnings)


def test_model_serving_config_errors_name_the_line(tmp_path: Path) -> None:
    f = _write(tmp_path, SERVING_CONFIG.replace("gracePeriodSeconds: 5", "gracePeriodSeconds: soon"))
    with pytest.raises(ConfigError) as e:
        read_config([f])
    assert (e.value.line, e.value.field) == (10, "config.yaml: scaleToZero.gracePeriodSeconds") and "is not of type 'integer'" in e.value.message
    f = _write(tmp_path, SERVING_CONFIG.replace("builtInServerTypes: [mlserver, triton]", "builtInServerTypes: [mlserver, tfserving]"))
    with pytest.raises(ConfigError, match=r"m.yaml:17: config.yaml: builtInServerTypes.1: 'tfserving' is not one of"):
        read_config([f])


def test_model_serving_config_from_the_api() -> None:
    obj = yaml.safe_load(SERVING_CONFIG)
    obj["metadata"]["namespace"] = "modelmesh-serving"
    sc = servingconfig.from_object(obj)
    assert sc.pool_replicas == 3 and sc.scale_to_zero is False
    assert sc.warnings[0].startswith("k8s:ConfigMap/modelmesh-serving/model-serving-config: config.yaml: headlessService: ignored")


def test_up_takes_serving_config_unless_set_explicitly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshserve.settings import Settings
    from meshserve.up import apply_serving_config

    _write(tmp_path, SERVING_CONFIG)
    monkeypatch.delenv("MESHSERVE_PODS", raising=False)
    monkeypatch.setenv("MESHSERVE_GATEWAY_REST_PORT", "9008")
    s = Settings.from_env(config_dir=tmp_path)
    lines = apply_serving_config(s, set())
    assert s.pods == 3 and s.gateway_rest_port == 9008
    assert "model-serving-config: pods = 3" in lines
    assert any(line.startswith("model-serving-config: gateway_rest_port stays 9008") for line in lines)
    assert sum(line.startswith("warning: ") for line in lines) == 3
    s = Settings.from_env(config_dir=tmp_path, pods=1)
    apply_serving_config(s, {"pods"})
    assert s.pods == 1


def test_readme_commands_need_nothing_outside_the_repository() -> None:
    """Every `@file` a README curl sends is in the repository, and the request there is the
    users' own (the shared fixture, byte for byte, where ../shared is present)."""
    readme = (REPO / "README.md").read_text()
    files = re.findall(r"-d @(\S+)", readme)
    assert files and all(not f.startswith("..") and (REPO / f).is_file() for f in files), files
    shared = SHARED / "fixtures" / "mnist-request-proto-json.json"
    if shared.exists():
        assert (REPO / files[0]).read_bytes() == shared.read_bytes()


def test_cli_apply_registers_a_predictor_and_refuses_an_unhandled_kind(tmp_path: Path) -> None:
    """Kind: integration (real Valkey, no mesh). The issue's case: `meshserve apply -f` on a
    Predictor registered nothing and exited 0; now it registers it, and a kind meshserve does
    not handle fails naming it, with nothing written."""
    import asyncio

    from click.testing import CliRunner

    from meshserve_testing import devmesh
    from meshserve.store import keys
    from meshserve.store import State
    from meshserve.cli import cli

    async def models(url: str) -> dict[str, str]:
        s = State.from_url(url)
        try:
            return {k.decode(): v.decode() for k, v in (await s.r.hgetall(keys.ALIASES)).items()}
        finally:
            await s.close()

    p = _write(tmp_path, PREDICTOR, "predictor.yaml")
    pvc = _write(tmp_path, LEGACY.replace("example-sklearn-isvc", "other") + "---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: c\n", "pvc.yaml")
    cm = _write(tmp_path, SERVING_CONFIG, "config.yaml")
    with devmesh.valkey() as v:
        env = {"MESHSERVE_REDIS_URL": v.url}
        res = CliRunner().invoke(cli, ["apply", "-f", str(pvc)], env=env)
        assert res.exit_code == 1 and f"{pvc}:14: kind: meshserve does not handle kind PersistentVolumeClaim" in res.output, res.output
        assert asyncio.run(models(v.url)) == {}, "nothing written"
        res = CliRunner().invoke(cli, ["apply", "-f", str(p), "-f", str(cm)], env=env)
        assert res.exit_code == 0, res.output
        assert re.search(r"^predictor/p -> p__ksp-[0-9a-f]{10}$", res.output, re.M), res.output
        assert "headlessService: ignored" in res.output
        assert asyncio.run(models(v.url))["p"].startswith("p__ksp-")


def test_scaling_and_server_types_from_model_serving_config() -> None:
    """podsPerRuntime: the replicas a pool comes back to from zero; builtInServerTypes:
    runtimes of other built-in server types are disabled, custom ones are kept."""
    from meshserve.k8s import objects as ob
    from meshserve_controller import scaling

    todo, _ = scaling.plan_scaling([ob.Pool("pool-a", "a", 0)], {"a"}, {}, 0.0, replicas=3)
    assert [(s.workload, s.replicas) for s in todo] == [("pool-a", 3)]
    runtimes = {r.name: r for r in map(ob.parse_runtime, [
        {"metadata": {"name": "triton-2.x"}, "spec": {"builtInAdapter": {"serverType": "triton"}, "supportedModelFormats": [{"name": "onnx"}]}},
        {"metadata": {"name": "mlserver-1.x"}, "spec": {"builtInAdapter": {"serverType": "mlserver"}, "supportedModelFormats": [{"name": "sklearn"}]}},
        {"metadata": {"name": "custom"}, "spec": {"supportedModelFormats": [{"name": "custom"}]}},
    ])}
    allowed = ob.allow_server_types(runtimes, frozenset({"mlserver"}))
    assert {n: r.disabled for n, r in allowed.items()} == {"triton-2.x": True, "mlserver-1.x": False, "custom": False}
    assert ob.allow_server_types(runtimes, None) == runtimes
