"""The deployment definitions under infra/, checked against the code they deploy.

Every manifest is parsed (KubeRay RayCluster and RayJobs, the Ray cluster launcher's config, the
Prefect server, worker and deployments, the Dockerfile) and the fields users rely on are
checked, so that none can drift from the code: one image tagged with pyproject's version, the
locked Ray and CUDA, the RayJobs' entrypoints run through the real CLI, the Prefect entrypoints
and parameters against the real flows, token auth everywhere, credentials only from Secrets or
instance profiles. No cluster, no network.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import inspect
import json
import re
import shlex
import tomllib
import typing
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOBS = {
    "train": INFRA / "kuberay" / "rayjob-train.yaml",
    "segment": INFRA / "kuberay" / "rayjob-segment.yaml",
}
LAUNCHER = INFRA / "ray-cluster.yaml"
PREFECT_YAML = INFRA / "prefect" / "prefect.yaml"
PREFECT_SERVER = INFRA / "prefect" / "server.yaml"
PREFECT_WORKER = INFRA / "prefect" / "worker.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
KUBERNETES_FILES = [RAYCLUSTER, *RAYJOBS.values(), PREFECT_SERVER, PREFECT_WORKER]

IMAGE_REPOSITORY = "ghcr.io/fcnpipe/fcnpipe"
NAMESPACE = "fcnpipe"
GPU = "nvidia.com/gpu"
TOKEN_KEY = "auth_token"  # the data key KubeRay's authOptions.secretName Secret must have
# Names of variables that hold credentials: they must come from a Secret, never a value.
SECRET_NAME_RE = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Reading the files


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _doc(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [doc for doc in _docs(path) if doc.get("kind") == kind]
    return doc


@cache
def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@cache
def _locked() -> dict[str, dict[str, Any]]:
    """uv.lock's packages by name."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {package["name"]: package for package in lock["package"]}


def _image() -> str:
    return f"{IMAGE_REPOSITORY}:{_pyproject()['project']['version']}"


def _locked_cuda() -> str:
    """CUDA major.minor of the locked torch: its +cuXYZ tag, else its CUDA runtime wheels."""
    torch = _locked()["torch"]
    local = re.search(r"\+cu(\d+)(\d)$", torch["version"])
    if local:
        return f"{local[1]}.{local[2]}"
    for dependency in torch.get("dependencies", []):
        name = dependency["name"]
        if name == "cuda-toolkit" or name.startswith("nvidia-cuda-runtime"):
            major, minor = _locked()[name]["version"].split(".")[:2]
            return f"{major}.{minor}"
    raise AssertionError(f"uv.lock's torch {torch['version']} is not a CUDA build")


def _raycluster() -> dict[str, Any]:
    return _doc(RAYCLUSTER, "RayCluster")


def _rayjob(kind: str) -> dict[str, Any]:
    return _doc(RAYJOBS[kind], "RayJob")


def _cluster_specs() -> dict[str, dict[str, Any]]:
    """Every Ray cluster spec: the RayCluster's and the one each RayJob embeds."""
    specs = {RAYCLUSTER.name: _raycluster()["spec"]}
    for kind, path in RAYJOBS.items():
        specs[path.name] = _rayjob(kind)["spec"]["rayClusterSpec"]
    return specs


def _groups(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The head group ("head") and the worker groups by name."""
    groups = {"head": spec["headGroupSpec"]}
    groups.update({group["groupName"]: group for group in spec["workerGroupSpecs"]})
    return groups


def _ray_containers() -> list[tuple[str, dict[str, Any]]]:
    """(where, container) for every container of every Ray pod template."""
    return [
        (f"{file} {name}/{container['name']}", container)
        for file, spec in _cluster_specs().items()
        for name, group in _groups(spec).items()
        for container in group["template"]["spec"]["containers"]
    ]


def _submitters() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{RAYJOBS[kind].name} submitter/{container['name']}", container)
        for kind in RAYJOBS
        for container in _rayjob(kind)["spec"]["submitterPodTemplate"]["spec"]["containers"]
    ]


def _prefect_worker() -> dict[str, Any]:
    (container,) = _doc(PREFECT_WORKER, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def _walk(node: Any) -> typing.Iterator[dict[str, Any]]:
    """Every mapping in a parsed document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


_QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}


def _quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "14", "56Gi") as a number (CPUs, bytes)."""
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    for suffix, factor in sorted(_QUANTITY.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def _dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions: continuation lines joined, comments dropped."""
    lines: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return lines


def _infra_text_files() -> list[Path]:
    files = []
    for path in sorted(INFRA.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        if b"\0" in path.read_bytes()[:4096]:
            continue
        files.append(path)
    return files


# ---------------------------------------------------------------------------------------------
# Kinds, image, versions


def test_manifests_are_the_kinds_and_api_versions_they_claim() -> None:
    expected = {
        RAYCLUSTER: {("ray.io/v1", "RayCluster")},
        RAYJOBS["train"]: {("ray.io/v1", "RayJob")},
        RAYJOBS["segment"]: {("ray.io/v1", "RayJob")},
        PREFECT_SERVER: {
            ("v1", "PersistentVolumeClaim"),
            ("apps/v1", "Deployment"),
            ("v1", "Service"),
        },
        PREFECT_WORKER: {("v1", "ConfigMap"), ("apps/v1", "Deployment")},
    }
    for path, kinds in expected.items():
        docs = _docs(path)
        assert {(doc["apiVersion"], doc["kind"]) for doc in docs} == kinds, path.name
        for doc in docs:
            # One namespace: the worker reaches the head Service by its short name.
            assert doc["metadata"]["namespace"] == NAMESPACE, (path.name, doc["kind"])


def test_every_container_runs_the_project_image_tagged_with_the_project_version() -> None:
    image = _image()
    images = [
        (path.name, node["image"])
        for path in KUBERNETES_FILES
        for doc in _docs(path)
        for node in _walk(doc)
        if "image" in node and "name" in node  # containers
    ]
    assert len(images) >= 3 * 3 + 2 + 2  # 3 Ray pods x 3 specs, 2 submitters, server, worker
    assert [(f, i) for f, i in images if i != image] == []
    docker = yaml.safe_load(LAUNCHER.read_text())["docker"]
    assert docker["image"] == image
    assert not {"head_image", "worker_image"} & set(docker)
    # The tag in every mention (build and push commands in comments included) is the version.
    for path in _infra_text_files():
        for tag in re.findall(re.escape(IMAGE_REPOSITORY) + r":([\w.\-]+)", path.read_text()):
            assert f"{IMAGE_REPOSITORY}:{tag}" == image, f"{path.relative_to(ROOT)}: {tag}"


def test_ray_version_is_the_locked_and_installed_ray() -> None:
    locked = _locked()["ray"]["version"]
    assert importlib.metadata.version("ray") == locked
    for name, spec in _cluster_specs().items():
        assert spec["rayVersion"] == locked, name


def test_rayjobs_run_on_the_rayclusters_spec() -> None:
    # One cluster shape in three places: a change to one must be made to all.
    for kind in RAYJOBS:
        assert _rayjob(kind)["spec"]["rayClusterSpec"] == _raycluster()["spec"], kind


# ---------------------------------------------------------------------------------------------
# Cluster shape: groups, GPUs, resources, autoscaling


def test_cluster_has_a_head_a_cpu_group_and_a_gpu_group_that_autoscale() -> None:
    for name, spec in _cluster_specs().items():
        assert spec["enableInTreeAutoscaling"] is True, name
        workers = spec["workerGroupSpecs"]
        assert [group["groupName"] for group in workers] == ["cpu", "gpu"], name
        for group in workers:
            bounds = (group["minReplicas"], group["replicas"], group["maxReplicas"])
            assert 0 <= bounds[0] <= bounds[1] <= bounds[2] and bounds[2] >= 1, (name, bounds)


def test_gpu_group_asks_for_gpus_tolerates_the_taint_and_tells_ray() -> None:
    for name, spec in _cluster_specs().items():
        groups = _groups(spec)
        for group_name, group in groups.items():
            (container,) = group["template"]["spec"]["containers"]
            limits = container["resources"]["limits"]
            gpus = int(limits.get(GPU, 0))
            assert int(group["rayStartParams"].get("num-gpus", 0)) == gpus, (name, group_name)
            tolerations = group["template"]["spec"].get("tolerations", [])
            tolerates = any(
                t["key"] == GPU and t.get("effect", "NoSchedule") == "NoSchedule"
                for t in tolerations
            )
            assert tolerates == (gpus > 0), (name, group_name, tolerations)
        assert int(groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"][GPU])
        assert GPU not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_ray_pods_have_guaranteed_resources_and_a_memory_backed_object_store() -> None:
    for name, spec in _cluster_specs().items():
        for group_name, group in _groups(spec).items():
            pod = group["template"]["spec"]
            (container,) = pod["containers"]
            where = (name, group_name)
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["limits"]), where
            assert resources["requests"] == resources["limits"], where
            store = int(group["rayStartParams"]["object-store-memory"])
            assert 0 < store < _quantity(resources["limits"]["memory"]), where
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            assert volume["emptyDir"]["medium"] == "Memory", where
            assert _quantity(volume["emptyDir"]["sizeLimit"]) >= store, where
        head = spec["headGroupSpec"]
        # Tasks and actors on workers only; the dashboard (Jobs API) reachable via the Service.
        assert head["rayStartParams"]["num-cpus"] == "0", name
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", name
        ports = {
            p["name"]: p["containerPort"]
            for p in head["template"]["spec"]["containers"][0]["ports"]
        }
        assert ports["dashboard"] == 8265, name


# ---------------------------------------------------------------------------------------------
# Auth and credentials


def _assert_token_env(where: str, container: dict[str, Any], secret: str) -> None:
    env = _env(container)
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    assert (ref.get("name"), ref.get("key")) == (secret, TOKEN_KEY), where


def test_token_auth_is_on_for_every_ray_container_the_submitters_and_the_prefect_worker() -> None:
    secret = _raycluster()["spec"]["authOptions"]["secretName"]
    for name, spec in _cluster_specs().items():
        # authOptions also tells the operator (its own dashboard calls, the autoscaler) the token.
        assert spec["authOptions"] == {"mode": "token", "secretName": secret}, name
    clients = [*_ray_containers(), *_submitters(), ("prefect worker", _prefect_worker())]
    assert len(clients) == 3 * 3 + 2 + 1
    for where, container in clients:
        _assert_token_env(where, container, secret)


def test_object_store_credentials_come_from_a_secret() -> None:
    # Drivers (on the head), Ray workers and the flows (reading the tables) all do the I/O.
    refs = set()
    for where, container in [*_ray_containers(), ("prefect worker", _prefect_worker())]:
        env = _env(container)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == name and not ref.get("optional"), where
            refs.add(ref["name"])
    assert len(refs) == 1, refs


def test_the_tables_catalog_reaches_the_drivers_and_the_flows_only() -> None:
    # The drivers (on the head) commit, the flows read; Ray workers only write data files.
    # Optional: without the Secret, each head uses its embedded catalog.
    keys = ("FCNPIPE_CATALOG", "PYICEBERG_CATALOG__FCNPIPE__CREDENTIAL")
    readers = [("prefect worker", _prefect_worker())]
    for where, container in [*_ray_containers(), *readers]:
        env = _env(container)
        if " head/" not in where and where != "prefect worker":
            assert not any(key in env for key in keys), where
            continue
        for key in keys:
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"], ref["optional"]) == ("fcnpipe-catalog", key, True)


def test_no_credential_is_written_inline() -> None:
    for path in KUBERNETES_FILES:
        for doc in _docs(path):
            assert doc["kind"] != "Secret", f"{path.name}: create Secrets with kubectl, not here"
            for node in _walk(doc):
                env = node.get("env")
                for entry in env if isinstance(env, list) else []:
                    if SECRET_NAME_RE.search(entry["name"]):
                        where = f"{path.name}: {entry['name']}"
                        assert "value" not in entry, where
                        assert "secretKeyRef" in entry["valueFrom"], where
    for option in yaml.safe_load(LAUNCHER.read_text())["docker"]["run_options"]:
        for name in re.findall(r"(?:-e|--env)[ =]([A-Za-z_][A-Za-z0-9_]*)=", option):
            assert not SECRET_NAME_RE.search(name), f"{LAUNCHER.name}: {option}"
    for line in _dockerfile_lines():
        if line.split()[0].upper() in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", line) or line.split()[1:2]
            assert not [n for n in names if SECRET_NAME_RE.search(n)], line


# What a credential looks like; a digest pin (image@sha256:...) is not one.
CREDENTIAL_PATTERNS = {
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a long hex token": re.compile(r"(?<!sha256:)(?<!sha1:)\b[0-9a-fA-F]{32,}\b"),
    "a long base64 token": re.compile(r"[A-Za-z0-9+/]{40,}={0,2}"),
}


def _credentials_in(text: str) -> list[str]:
    """Which kinds of credential the text seems to hold (never the matches themselves)."""
    found = []
    for what, pattern in CREDENTIAL_PATTERNS.items():
        for match in pattern.findall(text):
            # base64: mixed case and digits, unlike words, paths and names
            if what != "a long base64 token" or (
                re.search("[a-z]", match)
                and re.search("[A-Z]", match)
                and re.search("[0-9]", match)
            ):
                found.append(what)
                break
    return found


def test_no_file_under_infra_holds_a_key_or_a_token() -> None:
    files = _infra_text_files()
    assert DOCKERFILE in files and RAYCLUSTER in files
    for path in files:
        # Only the kinds are reported: a test log must not repeat a leaked secret.
        found = _credentials_in(path.read_text(errors="replace"))
        assert not found, f"{path.relative_to(ROOT)} holds {', '.join(found)}"


# ---------------------------------------------------------------------------------------------
# RayJobs: entrypoints through the real CLI


class _Ran(Exception):
    """Raised by the stand-in pipeline function with the configuration the CLI built."""

    def __init__(self, config: Any) -> None:
        super().__init__(type(config).__name__)
        self.config = config


@cache
def _entrypoint_config(kind: str) -> Any:
    """The TrainConfig / SegmentConfig a RayJob's entrypoint builds, through `fcnpipe` itself.

    The installed entry point's click command parses the arguments (an unknown option fails
    here) and its callback builds and validates the configuration; the pipeline function is
    replaced by one that hands the configuration back instead of starting Ray.
    """
    import ray.data
    import typer

    import pipeline.segment.driver
    import pipeline.train.driver
    from flows.cli import app

    argv = shlex.split(_rayjob(kind)["spec"]["entrypoint"])
    assert argv[:2] == ["fcnpipe", kind], argv

    def ran(config: Any, **_: Any) -> None:
        raise _Ran(config)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.train.driver, "train", ran)
        patch.setattr(pipeline.segment.driver, "segment", ran)
        # `fcnpipe segment` configures Ray Data's progress bars: not in this process's context.
        patch.setattr(ray.data.DataContext, "get_current", staticmethod(SimpleNamespace))
        command = typer.main.get_command(app)
        try:
            command.main(args=argv[1:], prog_name="fcnpipe", standalone_mode=False)
        except _Ran as done:
            return done.config
    raise AssertionError(f"{RAYJOBS[kind].name}: the entrypoint did not reach fcnpipe {kind}")


@pytest.mark.parametrize("kind", list(RAYJOBS))
def test_rayjob_entrypoint_is_a_valid_fcnpipe_command(kind: str) -> None:
    from pipeline.segment.config import SegmentConfig
    from pipeline.train.config import TrainConfig

    config = _entrypoint_config(kind)
    assert isinstance(config, TrainConfig if kind == "train" else SegmentConfig)
    assert config.scaling.use_gpu  # what the cluster's GPU group is for
    # A fixed run id: the RayJob's retry (backoffLimit) resumes the run instead of a new one.
    assert config.run_id is not None
    assert config.output_uri.startswith("s3://")
    spec = _rayjob(kind)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0


def test_segment_job_uses_the_model_the_train_job_writes() -> None:
    from pipeline.artifacts import model_uri

    train, segment = _entrypoint_config("train"), _entrypoint_config("segment")
    assert segment.model_uri == model_uri(train.output_uri, train.run_id)
    # The same output root: reports find the train run of a segment run there.
    assert segment.output_uri == train.output_uri


def _group_node(name: str) -> tuple[int, int, Any]:
    """A worker group's (minReplicas, maxReplicas, the pod as a ``pipeline.plan.Node``: its
    CPUs and GPUs, and its memory less the object store, as Ray counts it)."""
    from pipeline.plan import Node

    group = _groups(_raycluster()["spec"])[name]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    store = float(group["rayStartParams"].get("object-store-memory", 0))
    node = Node(
        cpus=_quantity(limits["cpu"]),
        gpus=float(limits.get(GPU, 0)),
        memory=_quantity(limits["memory"]) - store,
    )
    return group["minReplicas"], group["maxReplicas"], node


def _check_fits_the_cluster(where: str, kind: str, config: Any) -> None:
    """The job's plan (``pipeline.plan``) on the cluster at its smallest, and growing."""
    from pipeline.plan import NodeGroup, Resources, model_footprint, plan_segment, plan_train

    shapes = {name: _group_node(name) for name in ("cpu", "gpu")}
    resources = Resources(
        nodes=tuple(node for low, _, node in shapes.values() for _ in range(low)),
        groups=tuple(NodeGroup(node=node, max_count=high) for _, high, node in shapes.values()),
    )
    _, max_gpu_pods, gpu_pod = shapes["gpu"]
    if kind == "train":
        plan = plan_train(resources, config.scaling)
        assert plan.use_gpu, where
        # One GPU per DDP rank, its CPUs on the same pod; Ray Train waits for the autoscaler.
        assert plan.num_workers <= max_gpu_pods * gpu_pod.gpus, where
        assert plan.cpus_per_worker <= gpu_pod.cpus, where
    else:
        # The model the train job writes (fcn8s_resnet50, 21 VOC classes).
        plan = plan_segment(
            resources, config.scaling, footprint=model_footprint("fcn8s", "resnet50", 21)
        )
        assert plan.use_gpu and plan.actors >= 1, where  # the minimum cluster runs it
        assert plan.max_actors is not None and plan.max_actors >= max_gpu_pods, where
        assert plan.cpus_per_actor <= gpu_pod.cpus, where
        assert plan.memory_per_actor <= gpu_pod.memory, where


@pytest.mark.parametrize("kind", list(RAYJOBS))
def test_rayjob_fits_the_cluster_it_runs_on(kind: str) -> None:
    _check_fits_the_cluster(RAYJOBS[kind].name, kind, _entrypoint_config(kind))


# ---------------------------------------------------------------------------------------------
# The cluster launcher


@cache
def _launcher() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(LAUNCHER.read_text())
    return config


def test_launcher_config_is_valid_for_ray_and_installs_nothing() -> None:
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher()
    assert config["provider"]["type"] == "aws"
    prepared = prepare_config(copy.deepcopy(config))  # Ray's defaults for AWS filled in
    validate_config(prepared)  # Ray's own schema
    # Left out, the AWS defaults would pip-install another Ray on every node.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert prepared[key] == [], key
    assert prepared["initialization_commands"] == []


def test_launcher_node_types_mirror_the_kuberay_groups() -> None:
    config = _launcher()
    spec = _raycluster()["spec"]
    groups = _groups(spec)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert set(types) == set(groups)
    assert types["head"]["resources"].get("CPU") == int(
        groups["head"]["rayStartParams"]["num-cpus"]
    )
    for name, group in groups.items():
        if name == "head":
            continue
        node = types[name]
        assert (node["min_workers"], node["max_workers"]) == (
            group["minReplicas"],
            group["maxReplicas"],
        ), name
        assert node["resources"].get("GPU", 0) == int(group["rayStartParams"].get("num-gpus", 0))
    assert config["max_workers"] == sum(types[name].get("max_workers", 0) for name in types)
    assert config["idle_timeout_minutes"] * 60 == spec["autoscalerOptions"]["idleTimeoutSeconds"]
    # A GPU instance family for the GPU node type (g*, p*), a CPU one for the others.
    for name, node in types.items():
        family = node["node_config"]["InstanceType"][0]
        assert (family in "gp") == bool(node["resources"].get("GPU")), name
        # S3 and EC2 through instance profiles, never keys.
        assert "IamInstanceProfile" in node["node_config"], name


def test_launcher_starts_ray_with_token_auth_and_the_dashboard_on_the_head() -> None:
    config = _launcher()
    options = " ".join(config["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in options
    # The token: the default token path of the container's user, copied to every node.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    region = re.search(r"--env AWS_REGION=(\S+)", options)
    assert region and region[1] == config["provider"]["region"]
    head = " ".join(config["head_start_ray_commands"])
    for flag in ("--head", "--dashboard-host=0.0.0.0", "--num-cpus=0", "--autoscaling-config="):
        assert flag in head
    store = int(_groups(_raycluster()["spec"])["head"]["rayStartParams"]["object-store-memory"])
    assert f"--object-store-memory={store}" in head
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


# ---------------------------------------------------------------------------------------------
# Prefect: work pool, worker, deployments


def _deployments() -> list[dict[str, Any]]:
    deployments: list[dict[str, Any]] = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    return deployments


def _flow(entrypoint: str) -> Any:
    path, _, name = entrypoint.partition(":")
    assert (ROOT / path).is_file(), entrypoint
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def test_prefect_worker_polls_the_work_pool_the_deployments_name() -> None:
    command = _prefect_worker()["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    pool = command[command.index("--pool") + 1]
    assert command[command.index("--type") + 1] == "process"
    assert {d["work_pool"]["name"] for d in _deployments()} == {pool}
    # prefect.yaml's pull step runs the flows from FCNPIPE_HOME: the image's checkout.
    assert re.search(r"^ENV .*FCNPIPE_HOME=/app\b", "\n".join(_dockerfile_lines()), re.M)
    assert "WORKDIR /app" in _dockerfile_lines()


def test_prefect_deployments_name_real_flows_with_valid_parameters() -> None:
    from prefect import Flow

    from pipeline.config import from_json
    from pipeline.jobs import config_class
    from pipeline.train.config import TrainConfig

    for deployment in _deployments():
        flow = _flow(deployment["entrypoint"])
        assert isinstance(flow, Flow), deployment["entrypoint"]
        signature = inspect.signature(flow.fn)
        parameters = deployment["parameters"]
        assert set(parameters) <= set(signature.parameters), deployment["name"]
        is_train = typing.get_type_hints(flow.fn)["config"] is TrainConfig
        kind: Literal["train", "segment"] = "train" if is_train else "segment"
        # The same validation Prefect's parameter check and the Ray Job apply.
        config = from_json(config_class(kind), json.dumps(parameters["config"]))
        _check_fits_the_cluster(f"prefect.yaml {deployment['name']}", kind, config)


def test_flows_reach_the_kuberay_head_service_and_the_prefect_server() -> None:
    cluster = _raycluster()["metadata"]["name"]
    jobs_api = f"http://{cluster}-head-svc:8265"  # KubeRay names the head Service so
    data = _doc(PREFECT_WORKER, "ConfigMap")["data"]
    assert data["ray_address"] == jobs_api
    for deployment in _deployments():
        assert deployment["parameters"]["ray_address"] == jobs_api, deployment["name"]
    api_ref = _env(_prefect_worker())["PREFECT_API_URL"]["valueFrom"]["configMapKeyRef"]
    assert api_ref["name"] == _doc(PREFECT_WORKER, "ConfigMap")["metadata"]["name"]
    service = _doc(PREFECT_SERVER, "Service")
    (port,) = service["spec"]["ports"]
    assert data[api_ref["key"]] == f"http://{service['metadata']['name']}:{port['port']}/api"


# ---------------------------------------------------------------------------------------------
# The image


def test_dockerfile_base_is_the_cuda_of_the_locked_torch() -> None:
    (base,) = [line for line in _dockerfile_lines() if line.startswith("FROM nvidia/cuda:")]
    match = re.match(
        r"FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?(?:base|runtime|devel)-ubuntu\d+\.\d+",
        base,
    )
    assert match, base
    assert f"{match[1]}.{match[2]}" == _locked_cuda(), base


def test_dockerfile_installs_the_locked_environment_and_runs_as_a_user() -> None:
    from packaging.specifiers import SpecifierSet

    lines = _dockerfile_lines()
    text = "\n".join(lines)
    syncs = re.findall(r"uv sync[^&\n]*", text)
    assert syncs, "no uv sync"
    for sync in syncs:  # exactly uv.lock, without the dev tools
        assert "--frozen" in sync and "--no-dev" in sync, sync
    assert "--no-install-project" not in syncs[-1], "the project itself must be installed"
    # The launcher's autoscaler runs in this image on the head and adds EC2 nodes with boto3.
    assert all("--group cluster" in sync for sync in syncs), syncs
    assert any(d.startswith("boto3") for d in _pyproject()["dependency-groups"]["cluster"])
    versions = set(re.findall(r"UV_PYTHON=(\d+\.\d+)", text))
    versions |= set(re.findall(r"uv python install (\d+\.\d+)", text))
    (python,) = versions
    assert python in SpecifierSet(_pyproject()["project"]["requires-python"])
    venv = re.search(r"UV_PROJECT_ENVIRONMENT=(\S+)", text)
    # fcnpipe, ray and prefect on PATH
    assert venv and re.search(rf"^ENV .*\bPATH={re.escape(venv[1])}/bin:", text, re.M)
    assert any(line.startswith("COPY ") and "uv.lock" in line for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    # Running prefect (or fcnpipe, which imports it) as root would leave the user's
    # ~/.prefect owned by root, and the worker could not import prefect.
    last_user = max(i for i, line in enumerate(lines) if line.startswith("USER "))
    for i, line in enumerate(lines):
        if re.search(r"(^RUN|&&|;)\s*(prefect|fcnpipe)\s", line):
            assert i > last_user, f"runs prefect as root: {line}"


def test_dockerignore_keeps_the_venv_out_and_the_project_in() -> None:
    patterns = [
        line.strip().removeprefix("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".venv" in patterns and ".git" in patterns
    needed = [*_pyproject()["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]]
    needed += ["pyproject.toml", "uv.lock", "README.md"]
    for name in needed:
        assert (ROOT / name).exists(), name
        assert not [p for p in patterns if fnmatch.fnmatch(name, p)], name
    copies = [line.split()[1:-1] for line in _dockerfile_lines() if line.startswith("COPY ")]
    assert ["."] in copies, "the project is copied whole (minus the ignored paths)"
