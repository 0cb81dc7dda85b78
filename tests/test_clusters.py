"""The cluster files in clusters/ pass Ray's own validation (what `ray up` and KubeRay's in-tree
autoscaler run on them) and keep their promises: autoscaling GPU workers from zero, spot as an
option, the pinned Ray everywhere, no credentials, launch instructions at the top."""

import re
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.autoscaler._private.util import prepare_config, validate_config

from raydsnas.config import ConfigError
from raydsnas.preflight import load_cluster

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay-cluster.yaml", "kuberay-job.yaml"]
LOCAL = ["local-autoscaling.yaml"]  # tests/test_autoscaling.py runs it
# KubeRay v1.7.0's CRDs: data beside the checkout (CI has ../shared), not part of the project.
CRDS = ROOT.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters-v1.7.0.yaml", "RayJob": "ray.io_rayjobs-v1.7.0.yaml"}
SECRET = re.compile(r"(aws_secret_access_key|aws_access_key_id|secret_access_key|private_key"
                    r"|AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY)", re.IGNORECASE)


def ray_cluster_spec(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    return {"metadata": {"namespace": "default", **doc["metadata"]}, "spec": spec}


def test_every_cluster_file_is_covered():
    assert {p.name for p in (ROOT / "clusters").glob("*.yaml")} == set(LAUNCHER + KUBERAY + LOCAL)


def strict(schema):
    """A CRD's OpenAPI schema as `kubectl --validate=strict` applies it: an object schema that
    lists its properties rejects any other (unless it preserves unknown fields)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def crd_validator(kind: str):
    import jsonschema

    path = CRDS / CRD_FILES[kind]
    if not path.is_file():
        pytest.fail(f"{path} is missing: the KubeRay CRDs are read from ../shared/kuberay-crds")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_passes_the_kuberay_crd_schema(name):
    """Each manifest against KubeRay v1.7.0's own CRD schema, unknown fields as errors; a typo
    anywhere in it (here: in the worker group's template) is caught, naming the field."""
    doc = yaml.safe_load((ROOT / "clusters" / name).read_text())
    validator = crd_validator(doc["kind"])
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(doc)]
    assert errors == []
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["autoscalerOptions"]["version"] == "v2"  # explicit: KubeRay's default is v1
    spec["workerGroupSpecs"][0]["template"]["spec"]["tolerration"] = []
    spec["autoscalerOptions"]["version"] = "v3"
    found = {e.message for e in validator.iter_errors(doc)}
    assert any("'tolerration' was unexpected" in m for m in found), found
    assert any("'v3' is not one of ['v1', 'v2']" in m for m in found), found


@pytest.mark.parametrize("name", LAUNCHER + KUBERAY + LOCAL)
def test_cluster_file_turns_on_train_run_state(name):
    """Ray Train's run state (served at /api/train/v2/runs/v1) is on in every cluster."""
    path = ROOT / "clusters" / name
    if name in LOCAL:
        path = ROOT / "clusters" / "local-autoscaling.sh"  # the environment of its head
        assert "export RAY_TRAIN_ENABLE_STATE_TRACKING=1" in path.read_text()
        return
    doc = yaml.safe_load(path.read_text())
    if name in LAUNCHER:
        assert "--env RAY_TRAIN_ENABLE_STATE_TRACKING=1" in doc["docker"]["run_options"]
    else:
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
        assert {"name": "RAY_TRAIN_ENABLE_STATE_TRACKING", "value": "1"} in head["env"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_passes_ray_schema(name):
    raw = yaml.safe_load((ROOT / "clusters" / name).read_text())
    config = prepare_config(raw)  # what `ray up` does before validating
    validate_config(config)
    workers = {k: v for k, v in config["available_node_types"].items()
               if k != config["head_node_type"]}
    assert config["available_node_types"][config["head_node_type"]]["resources"]["CPU"] == 0
    assert all(v["min_workers"] == 0 for v in workers.values())
    assert all(v["resources"]["GPU"] >= 1 for v in workers.values())
    assert sum(v["max_workers"] for v in workers.values()) >= 2
    spot = [v["node_config"] for v in workers.values()
            if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            or v["node_config"].get("scheduling", {}).get("preemptible")]
    assert spot, "spot/preemptible workers are an option"
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]["node_config"]
    if config["provider"]["type"] == "aws":
        # Every node names its image (the default AMI's driver is too old for CUDA 13 torch),
        # and a head that launches workers carrying a profile has a profile of its own (which
        # holds iam:PassRole for it): Ray's default head role cannot pass one.
        assert all(n["node_config"]["ImageId"].startswith("resolve:ssm:") for n in nodes.values())
        if any("IamInstanceProfile" in v["node_config"] for v in workers.values()):
            assert "IamInstanceProfile" in head
    else:
        assert all("nvidia-580" in d["initializeParams"]["sourceImage"]
                   for n in nodes.values() for d in n["node_config"]["disks"])
        # The head runs as Ray's autoscaler account (it must start instances).
        assert "serviceAccounts" not in head
        assert all(v["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"
                   for v in workers.values())
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    setup = " ".join(config["setup_commands"])
    assert "clusters/requirements.txt" in setup and "-e /home/ray/raydsnas" in setup
    assert config["file_mounts"] == {"/home/ray/raydsnas": "."}


def test_schema_rejects_a_broken_launcher_yaml(tmp_path):
    raw = yaml.safe_load((ROOT / "clusters" / "aws.yaml").read_text())
    raw["available_node_types"]["gpu_on_demand"]["max_wokers"] = 4  # a typo
    with pytest.raises(Exception, match="max_wokers"):
        validate_config(prepare_config(raw))
    path = ROOT / "clusters" / "aws.yaml"
    broken = path.read_text().replace("min_workers: 0\n    max_workers: 2",
                                      "min_workers: 0\n    max_wokers: 2")
    assert broken != path.read_text()
    (tmp_path / "aws.yaml").write_text(broken)
    with pytest.raises(ConfigError, match="max_wokers"):
        load_cluster(tmp_path / "aws.yaml")


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_passes_ray_autoscaler(name):
    doc = yaml.safe_load((ROOT / "clusters" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    spec = ray_cluster_spec(ROOT / "clusters" / name)
    # KubeRay's in-tree autoscaler turns the spec into this config (and validates it) itself.
    config = _derive_autoscaling_config_from_ray_cr(spec)
    assert spec["spec"]["enableInTreeAutoscaling"] is True
    assert spec["spec"]["rayVersion"] == ray.__version__
    gpu = config["available_node_types"]["gpu"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 2 and gpu["resources"]["GPU"] == 8
    assert config["available_node_types"]["headgroup"]["resources"]["CPU"] == 0
    if doc["kind"] == "RayJob":
        prefix = "python -m raydsnas.search --config /home/ray/raydsnas/"  # the image's checkout
        assert doc["spec"]["entrypoint"].startswith(prefix)
        assert (ROOT / doc["spec"]["entrypoint"][len(prefix):].split()[0]).is_file()


@pytest.mark.parametrize("name", LAUNCHER + KUBERAY + LOCAL + ["local-autoscaling.sh",
                                                              "Dockerfile"])
def test_cluster_file_has_no_secrets_and_says_how_to_launch(name):
    text = (ROOT / "clusters" / name).read_text()
    assert not SECRET.search(text)
    header = text.split("\n\n")[0]
    launch = {"aws.yaml": "ray up clusters/aws.yaml", "gcp.yaml": "ray up clusters/gcp.yaml",
              "kuberay-cluster.yaml": "kubectl apply -f clusters/kuberay-cluster.yaml",
              "kuberay-job.yaml": "kubectl apply -f clusters/kuberay-job.yaml",
              "local-autoscaling.yaml": "bash clusters/local-autoscaling.sh",
              "local-autoscaling.sh": "bash clusters/local-autoscaling.sh",
              "Dockerfile": "docker build -f clusters/Dockerfile"}[name]
    assert launch in header


def test_pinned_requirements_satisfy_pyproject():
    """clusters/requirements.txt pins one version of every dependency, inside pyproject's ranges,
    with the Ray of the images and of this machine."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    pins = {}
    for line in (ROOT / "clusters" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower()] = spec.version
    assert set(pins) == set(ranges)
    for name, version in pins.items():
        assert ranges[name].specifier.contains(version), (name, version, ranges[name])
    # The `gcp` extra (gcsfs for gs://) is installed pinned, at fsspec's version, where used.
    (gcs,) = [Requirement(r) for r in project["optional-dependencies"]["gcp"]]
    for name in ("gcp.yaml", "Dockerfile"):
        (pin,) = re.findall(r"gcsfs==(\S+)", (ROOT / "clusters" / name).read_text())
        assert gcs.specifier.contains(pin) and pin == pins["fsspec"]
    assert pins["ray"] == ray.__version__
    dockerfile = (ROOT / "clusters" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
