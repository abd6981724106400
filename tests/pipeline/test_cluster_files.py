"""What the deployment files say, checked without a cluster: the launcher config against the schema Ray
ships, the KubeRay files against the Ray, image and node sizes they name, the image against the
environment CI tests, and every entrypoint against its job's parser. The files at work on a real Ray
cluster: test_cluster.py."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from jobs._cli import parse
from jobs.bench.sizing import INSTANCES, FeedFigures, cores_per_gpu
from ltrp.pipeline.configs import EvaluateConfig, ScoreConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
SETTINGS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
)
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")  # never in a RayJob
JOB_MODULES = ("jobs.score", "jobs.train", "jobs.evaluate", "jobs.promote")
LAUNCHER_CONFIGS = {
    "jobs.score": (ScoreConfig, "score"),
    "jobs.train": (TrainConfig, "train"),
    "jobs.evaluate": (EvaluateConfig, "evaluate"),
}
AWS_VALUES = {"LTRP_IMAGE": "ghcr.io/ltrp/ltrp:0.1.0-0123456789ab", "LTRP_AMI": "ami-0123456789abcdef0"}


def _yaml_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [
        (p, d)
        for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
    ]


def test_cluster_files_parse_and_their_entrypoints_name_existing_modules() -> None:
    files = _yaml_files()
    assert {f.name for f in files} >= {
        "runtime_env.yaml",
        "aws.yaml",
        "raycluster.yaml",
        "rayjob-score.yaml",
        "rayjob-train.yaml",
        "rayjob-evaluate.yaml",
    }
    assert not [p for p in CLUSTER.rglob("*.py")]  # declarative files only
    named = set()
    env_vars = yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"]
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), path
        for doc in docs:
            if doc.get("kind") == "RayJob":
                spec = doc["spec"]
                assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
                named |= set(re.findall(r"python -m ([\w.]+)", spec["entrypoint"]))
                _parses(spec["entrypoint"])
                # The job's runtime env is the one of ray job submit, the same way, but for the credentials:
                # a RayJob is readable by whoever may read RayJobs, so they come from a Secret instead.
                job_env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
                assert job_env == {k: v for k, v in env_vars.items() if k not in CREDENTIALS}, path
    assert named == {"jobs.score", "jobs.train", "jobs.evaluate"}
    missing = [m for m in JOB_MODULES if importlib.util.find_spec(m) is None]
    assert not missing, f"entrypoint modules missing: {missing}"


def _parses(entrypoint: str) -> None:
    """The entrypoint's flags exist and its values pass the job's config checks (placeholders filled)."""
    module, *args = shlex.split(re.sub(r"\$\{?\w+\}?", "x", entrypoint).split("python -m ", 1)[1])
    cls, section = LAUNCHER_CONFIGS[module]
    parse(cls, section, args, prog=module)  # exits with code 2 on a flag or value the job refuses


def test_placeholders_are_only_the_documented_settings() -> None:
    """Every file rendered with envsubst names only the settings, the storage root and the image, so
    that envsubst leaves nothing else blank; the launcher config names only the image and the AMI (its
    $RAY_HEAD_IP is Ray's own, which the README's `envsubst '$LTRP_IMAGE $LTRP_AMI'` leaves alone)."""
    names = set()
    for path in [RUNTIME_ENV, *sorted((CLUSTER / "kuberay").glob("*.yaml"))]:
        names |= set(re.findall(r"\$\{?(\w+)", path.read_text()))
    assert names <= {*SETTINGS, "LTRP_ROOT", "LTRP_IMAGE"}
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    assert set(env["env_vars"]) >= set(SETTINGS)
    assert {".venv/", ".git/", "runs/", "mlruns/", "mlflow.db"} <= set(env["excludes"])
    assert set(re.findall(r"\$\{(\w+)\}", (CLUSTER / "aws.yaml").read_text())) == set(AWS_VALUES)


def _launcher_config() -> dict:
    """cluster/aws.yaml rendered as the README renders it, then completed by Ray as `ray up` does."""
    text = re.sub(
        r"\$\{(LTRP_IMAGE|LTRP_AMI)\}", lambda m: AWS_VALUES[m[1]], (CLUSTER / "aws.yaml").read_text()
    )
    return prepare_config(yaml.safe_load(text))


def test_launcher_config_passes_rays_schema_and_installs_nothing_at_start() -> None:
    config = _launcher_config()
    validate_config(config)  # ray/autoscaler/ray-schema.json; raises on a bad or unknown key
    # Ray's AWS defaults would pip install boto3 on the head; the image has it.
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], key
    docker = config["docker"]
    assert docker["head_image"] == AWS_VALUES["LTRP_IMAGE"] and docker["pull_before_run"]
    assert docker["worker_image"] == AWS_VALUES["LTRP_IMAGE"] + "-worker"
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        # A concrete AMI: the head launches workers with a role that may not read SSM ("resolve:ssm:").
        assert node["ImageId"] == AWS_VALUES["LTRP_AMI"], name
        assert node["InstanceType"] in INSTANCES, name
    print(
        "ray-schema.json: cluster/aws.yaml valid after prepare_config;",
        len(config["available_node_types"]),
        "node types",
    )


def _quantity_gib(value: str | int) -> float:
    """A Kubernetes memory quantity in GiB ("24Gi", "512Mi")."""
    number, unit = re.fullmatch(r"([\d.]+)(Gi|Mi)?", str(value)).groups()
    return float(number) * {"Gi": 1.0, "Mi": 1 / 1024, None: 1 / 2**30}[unit]


def _pod_templates() -> list[tuple[str, dict, dict]]:
    """(where, ray cluster spec, pod spec) of every Ray pod in the KubeRay files."""
    pods = []
    for path, doc in _kuberay_docs():
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        groups = [("head", cluster["headGroupSpec"])]
        groups += [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
        pods += [(f"{path.name}:{name}", cluster, group["template"]["spec"]) for name, group in groups]
    return pods


@pytest.mark.parametrize(
    ("where", "cluster", "pod"), _pod_templates(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_kuberay_pods_fit_their_nodes_and_run_the_tested_ray(where: str, cluster: dict, pod: dict) -> None:
    # KubeRay picks its probes by rayVersion (HTTP from 2.53, else an exec of wget): the image's Ray.
    assert cluster["rayVersion"] == ray.__version__, where
    assert pod["securityContext"]["runAsNonRoot"] is True, where
    (container,) = pod["containers"]
    image = "${LTRP_IMAGE}" if where.endswith(":head") else "${LTRP_IMAGE}-worker"  # the stages' lock only
    assert container["image"] == image and container["imagePullPolicy"] == "IfNotPresent", where
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert requests == limits, where  # Ray sizes itself by the limits: a request below them oversubscribes
    node = INSTANCES[pod["nodeSelector"]["node.kubernetes.io/instance-type"]]
    vcpus, gib, gpus = node.vcpus, node.gib, node.gpus
    # The kubelet, the system and the daemon sets keep at least a core and a tenth of the memory.
    assert float(requests["cpu"]) <= vcpus - 1, where
    memory = _quantity_gib(requests["memory"])
    assert memory <= 0.9 * gib - 1, where
    assert int(requests.get("nvidia.com/gpu", 0)) <= gpus, where
    # The object store (30% of the memory by default) in /dev/shm, not on disk.
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory", where
    assert 0.3 * memory <= _quantity_gib(volume["emptyDir"]["sizeLimit"]) < memory, where


def _ray_containers() -> list[tuple[str, str, dict]]:
    """(file, kind, container) of every container that runs Ray or submits to it in the KubeRay files."""
    found = [(where.split(":")[0], "", c) for where, _, pod in _pod_templates() for c in pod["containers"]]
    for path, doc in _kuberay_docs():
        if doc["kind"] == "RayJob":
            found += [
                (path.name, "submitter", c) for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]
            ]
    return found


def test_every_ray_process_needs_the_token_and_rayjobs_hold_no_credentials() -> None:
    """Token authentication on every node and submitter (the token from a Secret, not in the file); a
    RayJob's S3 credentials from a Secret; the launcher mounts the token on every node and starts Ray
    with RAY_AUTH_MODE=token. test_cluster.py shows a cluster set up so refusing a submission."""
    for path, kind, container in _ray_containers():
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", (path, kind)
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "ltrp-ray-auth",
            "key": "auth_token",
        }
        if path.startswith("rayjob") and kind != "submitter":
            assert container["envFrom"] == [{"secretRef": {"name": "ltrp-s3", "optional": True}}], path
    for path in sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml")):
        assert not [c for c in CREDENTIALS if c in path.read_text()], path
    config = _launcher_config()
    assert config["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token ray start" in start, key


def test_rayjobs_have_a_deadline() -> None:
    """A stuck job gives its GPUs back instead of holding them forever."""
    jobs = [(p, d) for p, d in _kuberay_docs() if d["kind"] == "RayJob"]
    assert len(jobs) == 3
    for path, doc in jobs:
        assert 0 < doc["spec"]["activeDeadlineSeconds"] <= 7 * 24 * 3600, path


def _dockerfile() -> str:
    return re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())


def test_image_is_rays_own_for_our_ray_and_python_running_as_a_user() -> None:
    dockerfile = _dockerfile()
    (ray_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M)
    assert ray_version == ray.__version__
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-(gpu|cu\d+)$", dockerfile, re.M)
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    env = " ".join(re.findall(r"^ENV (.+)$", dockerfile, re.M))
    assert "NVIDIA_VISIBLE_DEVICES=all" in env and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env


def _locked(name: str) -> dict[str, tuple[str, list[str]]]:
    """requirements/NAME.lock: package -> (version, its hashes)."""
    text = (ROOT / "requirements" / f"{name}.lock").read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            requirement, *options = line.split()
            package, version = requirement.split("==")
            pins[_canonical(package)] = (version, [o.removeprefix("--hash=sha256:") for o in options])
    return pins


def test_the_venv_and_the_images_install_the_locked_versions_ci_tests() -> None:
    """The Makefile and the Dockerfile install a lock with hashes, pip refusing anything unhashed; the
    dev lock is this environment and covers every dependency of the project; the worker and head locks
    pin the same versions, the worker's without the drivers' packages."""
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --require-hashes -r requirements/dev.lock" in makefile
    runs = [" ".join(line.split()) for line in _dockerfile().splitlines() if "pip install" in line]
    assert runs == [
        "RUN pip install --no-cache-dir --require-hashes -r requirements/${LOCK}.lock",
        "RUN pip install --no-cache-dir --no-deps -e .",
    ]
    locks = {name: _locked(name) for name in ("dev", "worker", "head")}
    for name, pins in locks.items():
        unhashed = [p for p, (_, hashes) in pins.items() if not hashes]
        assert not unhashed, f"requirements/{name}.lock: no hash for {unhashed} (make pin)"
    dev = locks["dev"]
    installed = {p: importlib.metadata.version(p) for p in dev}
    wrong = {p: (v, installed[p]) for p, (v, _) in dev.items() if installed[p] != v}
    assert not wrong, f"requirements/dev.lock is not this environment (make pin): {wrong}"
    needed = [Requirement(r) for r in importlib.metadata.requires("ltrp")]
    unpinned = [str(r.name) for r in needed if _canonical(r.name) not in dev | locks["head"]]
    assert not unpinned, f"not in the locks (make pin): {unpinned}"
    for name in ("worker", "head"):
        differ = {p: v for p, (v, _) in locks[name].items() if p in dev and dev[p][0] != v}
        assert not differ, f"requirements/{name}.lock and dev.lock pin other versions: {differ}"
    drivers_only = {"scipy", "scikit-image", "matplotlib", "mlflow", "sqlalchemy", "alembic", "flask"}
    assert not drivers_only & set(locks["worker"]) and drivers_only | {"boto3"} <= set(locks["head"])


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _gpu_nodes() -> list[tuple[str, float, int, str]]:
    """(where, CPUs, GPUs, GPU model) of every node or pod with GPUs that the cluster files start."""
    found = []
    for name, node_type in _launcher_config()["available_node_types"].items():
        node = INSTANCES[node_type["node_config"]["InstanceType"]]
        if node.gpus:  # `resources: {}`: Ray counts the instance's vCPUs and GPUs
            found.append((f"aws.yaml:{name}", node.vcpus, node.gpus, node.gpu))
    for where, _, pod in _pod_templates():
        requests = pod["containers"][0]["resources"]["requests"]
        if int(requests.get("nvidia.com/gpu", 0)):
            node = INSTANCES[pod["nodeSelector"]["node.kubernetes.io/instance-type"]]
            found.append((where, float(requests["cpu"]), int(requests["nvidia.com/gpu"]), node.gpu))
    return found


def test_gpu_nodes_have_the_cores_the_sizing_table_asks_for() -> None:
    """docs/cluster.md's table (`jobs.bench.sizing`): each GPU's own node decodes for it, from S3, at
    the K that needs the most cores, beside its scoring actor; the RayJob that scores starts no CPU-only
    workers, whose pixels would cross the network (`jobs.bench.feed`: that costs more CPU than decoding)."""
    feed = FeedFigures.load()
    nodes = _gpu_nodes()
    # The scoring actor's CPUs: ScoreConfig's worker_cpus default, which no cluster file overrides.
    (actor_cpus,) = [f.default for f in dataclasses.fields(ScoreConfig) if f.name == "worker_cpus"]
    assert nodes
    for where, cpus, gpus, gpu in nodes:
        need = max(cores_per_gpu(feed, gpu, "mae_vit_base_patch16", k, "s3") for k in (1, 4, 8))
        assert cpus / gpus >= need + actor_cpus, where
    score = [doc for path, doc in _kuberay_docs() if path.name == "rayjob-score.yaml"]
    for group in score[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert int(resources.get("nvidia.com/gpu", 0)) > 0, group["groupName"]
