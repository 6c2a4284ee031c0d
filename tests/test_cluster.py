"""The cluster manifests under cluster/ against the package: commands, configs, image and Ray version, GPU capacity,
shared storage, and that nothing is exposed beyond the cluster. Offline; parses files, starts nothing."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
RAYJOBS = {"tune": KUBERAY / "rayjob-tune.yaml", "scale": KUBERAY / "rayjob-scale.yaml"}
RAY_ENV, SERVER_ENV = CLUSTER / "ray.env.example", CLUSTER / "mlflow-server.env.example"
#: where the launcher configs load each env file from (file_mounts put ~/.fisher-scale/secrets there)
RAY_ENV_FILE, SERVER_ENV_FILE = "fisher-scale-secrets/ray.env", "fisher-scale-secrets/mlflow-server.env"
EXPECTED_FILES = [
    *LAUNCHER.values(),
    *RAYJOBS.values(),
    KUBERAY / "raycluster.yaml",
    KUBERAY / "storage.yaml",
    KUBERAY / "mlflow.yaml",
    KUBERAY / "network-policies.yaml",
    RAY_ENV,
    SERVER_ENV,
    CLUSTER / "Dockerfile",
    CLUSTER / "README.md",
]
CLUSTER_PORTS = {5000, 6379, 8265}  # MLflow, Ray GCS, Ray dashboard / job API
OPEN_CIDRS = {"0.0.0.0/0", "::/0"}
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
CONFIG_PATH = re.compile(r"(?:^|/)(tune_configs/[\w.\-]+\.ya?ml)$")


# --- reading the files ---------------------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    """All YAML documents of a file (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    """The single YAML document of a file."""
    docs = load_docs(path)
    assert len(docs) == 1, f"{path.relative_to(ROOT)}: expected one YAML document, found {len(docs)}"
    return docs[0]


def pyproject() -> dict[str, Any]:
    """pyproject.toml, parsed."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    """The package's requirement on `name`."""
    for text in pyproject()["project"]["dependencies"]:
        req = Requirement(text)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml does not depend on {name}")


def dockerfile() -> dict[str, Any]:
    """The Dockerfile's ARG defaults, resolved FROM image, WORKDIR and RUN instructions."""
    text = (CLUSTER / "Dockerfile").read_text()
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()  # join continuation lines
    args: dict[str, str] = {}
    info: dict[str, Any] = {"args": args, "runs": [], "from": None, "workdir": None}

    def expand(value: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)

    for line in lines:
        parts = line.strip().split(maxsplit=1)
        if not parts or parts[0].startswith("#"):
            continue
        instruction, rest = parts[0].upper(), parts[1] if len(parts) > 1 else ""
        if instruction == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key.strip()] = value.strip().strip('"')
        elif instruction == "FROM":
            info["from"] = expand(rest.split()[0])
        elif instruction == "WORKDIR":
            info["workdir"] = expand(rest.strip())
        elif instruction == "RUN":
            info["runs"].append(expand(rest))
    return info


def readme_code() -> list[str]:
    """The fenced code blocks of cluster/README.md, continuation lines joined, one command line per entry."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (CLUSTER / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]


def launcher_commands(config: dict[str, Any]) -> list[str]:
    """Every shell command a cluster launcher config runs (setup and start, all node types)."""
    commands = [command for key in COMMAND_LISTS for command in config.get(key, [])]
    for node_type in config["available_node_types"].values():
        commands += [c for key in COMMAND_LISTS for c in node_type.get(key, [])]
    return commands


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object under cluster/kuberay/."""
    return [(path, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_docs(path)]


def cluster_specs() -> dict[str, dict[str, Any]]:
    """The RayCluster spec of raycluster.yaml and the rayClusterSpec of every RayJob."""
    specs = {"raycluster": load_one(KUBERAY / "raycluster.yaml")["spec"]}
    for name, path in RAYJOBS.items():
        specs[f"rayjob-{name}"] = load_one(path)["spec"]["rayClusterSpec"]
    return specs


def pod_specs(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod specs of a RayCluster spec: the head and each worker group."""
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec.get("workerGroupSpecs", []):
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def images(node: Any) -> Iterator[str]:
    """Every container image a manifest names (cluster launcher docker section, Kubernetes containers)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"image", "head_image", "worker_image"} and isinstance(value, str):
                yield value
            else:
                yield from images(value)
    elif isinstance(node, list):
        for item in node:
            yield from images(item)


# --- shell commands that run fisher-scale --------------------------------------------------------------------------


def simple_commands(text: str) -> Iterator[list[str]]:
    """Split shell text into simple commands (token lists), descending into quoted scripts (`bash -c '...'`)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    current: list[str] = []
    for token in lexer:
        if token in SHELL_OPERATORS:
            if current:
                yield current
            current = []
            continue
        if any(ch.isspace() for ch in token) and "fisher-scale" in token:
            yield from simple_commands(token)
        current.append(token)
    if current:
        yield current


def fisher_scale_argvs(text: str) -> list[list[str]]:
    """The argument lists of every `fisher-scale ...` in command position (also after `--`, as in `ray job submit`)."""
    found = []
    for tokens in simple_commands(text):
        start = 0
        while start < len(tokens) and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[start]):
            start += 1  # environment assignments before the command
        positions = [start] + [i + 1 for i, token in enumerate(tokens) if token == "--"]
        for i in positions:
            if i < len(tokens) and tokens[i] == "fisher-scale":
                found.append(tokens[i + 1 :])
    return found


def all_fisher_scale_argvs() -> dict[str, list[list[str]]]:
    """`fisher-scale` invocations by source: launcher commands, RayJob entrypoints, README code, Dockerfile RUNs."""
    sources: dict[str, list[list[str]]] = {}
    for name, path in LAUNCHER.items():
        sources[f"{name}.yaml"] = [a for c in launcher_commands(load_one(path)) for a in fisher_scale_argvs(c)]
    for name, path in RAYJOBS.items():
        sources[f"rayjob-{name}.yaml"] = fisher_scale_argvs(load_one(path)["spec"]["entrypoint"])
    sources["README.md"] = [a for line in readme_code() for a in fisher_scale_argvs(line)]
    sources["Dockerfile"] = [a for run in dockerfile()["runs"] for a in fisher_scale_argvs(run)]
    return sources


def config_paths(argv: list[str]) -> list[str]:
    """The tune_configs/... files an invocation names, as written."""
    return [token for token in argv if CONFIG_PATH.search(token)]


def repo_config(token: str) -> Path:
    """The repository file a config argument refers to: relative to the checkout (`ray job submit --working-dir .`)
    or absolute inside the image (the Dockerfile's WORKDIR holds the checkout)."""
    if token.startswith("/"):
        workdir = dockerfile()["workdir"]
        assert token.startswith(workdir + "/"), f"{token}: an absolute config path must lie in the image's {workdir}"
        token = token[len(workdir) + 1 :]
    return ROOT / token


# --- GPU capacity --------------------------------------------------------------------------------------------------


def key_values(node: Any, name: str) -> Iterator[int]:
    """Every integer under a mapping key `name` (or `<prefix>.name`, grid style), at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and (key == name or key.endswith("." + name)):
                yield from integers(value)
            else:
                yield from key_values(value, name)
    elif isinstance(node, list):
        for item in node:
            yield from key_values(item, name)


def integers(node: Any) -> Iterator[int]:
    """Every integer in a value (scalars, lists, nested grids); booleans are not integers here."""
    if isinstance(node, bool):
        return
    if isinstance(node, int):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from integers(value)
    elif isinstance(node, list):
        for item in node:
            yield from integers(item)


def demand(config: Path) -> tuple[int, int]:
    """(largest num_workers, largest cpus_per_worker) of an experiment config, trial or grid point."""
    assert config.is_file(), (
        f"{config.relative_to(ROOT)} is named by a cluster manifest but does not exist: the manifests run it, "
        "so it must be in the repository"
    )
    data = yaml.safe_load(config.read_text())
    assert data.get("distributed", {}).get("use_gpu") is True, (
        f"{config.relative_to(ROOT)} runs on the GPU clusters but does not set distributed.use_gpu: true"
    )
    workers = max(key_values(data, "num_workers"), default=1)
    cpus = max(key_values(data, "cpus_per_worker"), default=1)
    return workers, cpus


def k8s_cpus(quantity: str | int) -> float:
    """A Kubernetes CPU quantity ("88", "500m", 8) in CPUs."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def launcher_nodes(config: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(GPUs, CPUs, max nodes) of each GPU worker node type of a cluster launcher config."""
    nodes = []
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources", {})
        if name != config["head_node_type"] and resources.get("GPU", 0) > 0:
            count = min(node_type.get("max_workers", config["max_workers"]), config["max_workers"])
            nodes.append((resources["GPU"], resources.get("CPU", 0), count))
    return nodes


def kuberay_nodes(spec: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(GPUs, CPUs, max pods) of each GPU worker group of a RayCluster spec."""
    nodes = []
    for group in spec.get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if gpus > 0:
            autoscaling = spec.get("enableInTreeAutoscaling", False)
            count = group["maxReplicas"] if autoscaling else group["replicas"]
            nodes.append((gpus, int(k8s_cpus(limits["cpu"])), count))
    return nodes


def capacity(nodes: list[tuple[int, int, int]], cpus_per_worker: int) -> int:
    """How many one-GPU training workers of `cpus_per_worker` CPUs the nodes hold at most."""
    return sum(min(gpus, cpus // cpus_per_worker) * count for gpus, cpus, count in nodes)


# --- exposure ------------------------------------------------------------------------------------------------------


def exposures(node: Any, where: str = "") -> Iterator[str]:
    """Rules or objects that make the dashboard, GCS or MLflow reachable from outside the cluster."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from exposures(item, f"{where}[{i}]")
        return
    if not isinstance(node, dict):
        return
    for rule in node.get("IpPermissions", []) or []:  # AWS security group rules
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        if cidrs & OPEN_CIDRS:
            low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
            if str(rule.get("IpProtocol")) == "-1" or low == -1 or any(low <= p <= high for p in CLUSTER_PORTS):
                yield f"{where}: security group rule {rule} opens a cluster port to the internet"
    if "sourceRanges" in node and set(node["sourceRanges"]) & OPEN_CIDRS:  # GCP firewall rule
        for allowed in node.get("allowed", [{}]):
            ports = allowed.get("ports")
            spans = [tuple(int(x) for x in p.split("-")) if "-" in p else (int(p), int(p)) for p in ports or []]
            if not ports or any(lo <= p <= hi for lo, hi in spans for p in CLUSTER_PORTS):
                yield f"{where}: firewall rule {node.get('name', node)} opens a cluster port to the internet"
    if node.get("kind") == "Service" and node.get("spec", {}).get("type") in {"LoadBalancer", "NodePort"}:
        yield f"{where}: Service {node['metadata']['name']} is of type {node['spec']['type']}"
    if node.get("kind") == "Ingress":
        yield f"{where}: Ingress {node['metadata']['name']}"
    if node.get("serviceType") in {"LoadBalancer", "NodePort"}:
        yield f"{where}: Ray head service of type {node['serviceType']}"
    if node.get("hostNetwork") is True:
        yield f"{where}: pod on the host network"
    for port in node.get("ports", []) or []:
        if isinstance(port, dict) and port.get("hostPort") in CLUSTER_PORTS:
            yield f"{where}: hostPort {port['hostPort']}"
    for key, value in node.items():
        yield from exposures(value, f"{where}.{key}")


# --- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXPECTED_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_manifest_exists_and_parses(path: Path) -> None:
    """Every manifest the walk-through uses is there; YAML files parse into objects."""
    assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    if path.suffix == ".yaml":
        docs = load_docs(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), f"{path.relative_to(ROOT)}: no YAML mapping"


def test_every_yaml_under_cluster_parses() -> None:
    """No YAML file under cluster/ is broken, including ones added later."""
    paths = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert len(paths) >= 7
    for path in paths:
        assert all(isinstance(doc, dict) for doc in load_docs(path)), f"{path.relative_to(ROOT)}"


@pytest.mark.parametrize("cloud", list(LAUNCHER))
def test_launcher_config_follows_rays_schema(cloud: str) -> None:
    """aws.yaml / gcp.yaml validate against the installed Ray's cluster launcher schema, as `ray up` does."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    config = load_one(LAUNCHER[cloud])
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == cloud
    assert config["head_node_type"] in config["available_node_types"]
    assert launcher_nodes(config), f"{cloud}.yaml has no GPU worker node type"


def test_dockerfile_builds_on_rays_gpu_image_with_cuda_torch() -> None:
    """The base image is Ray's GPU image, torch comes from PyTorch's index in the package's range, the repo is
    installed with pip, and the Python of the image is one the package supports."""
    info = dockerfile()
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", info["from"] or "")
    assert match, f"base image {info['from']!r} is not rayproject/ray:<version>-py<NN>-gpu"
    python = Version(f"{match.group(2)}.{match.group(3)}")
    assert python in SpecifierSet(pyproject()["project"]["requires-python"])
    torch = Version(info["args"]["TORCH_VERSION"])
    assert torch in requirement("torch").specifier, f"torch {torch} outside {requirement('torch')}"
    runs = " ".join(info["runs"])
    assert "https://download.pytorch.org/whl/" in runs
    assert re.search(r"pip install [^&]*[\"']?\.(\[[\w,-]+\])?[\"']?(\s|$)", runs), "the image must `pip install .`"
    assert info["workdir"], "the Dockerfile sets no WORKDIR (where the checkout lives in the image)"


def test_ray_version_is_the_packages() -> None:
    """Every Ray version the manifests name (base image, image tags, rayVersion, setup checks) is one version, with
    the installed Ray's major.minor, inside pyproject's ray requirement."""
    versions: dict[str, str] = {"Dockerfile FROM": dockerfile()["from"].split(":")[1].split("-")[0]}
    for path in [*LAUNCHER.values(), *KUBERAY.glob("*.yaml")]:
        for doc in load_docs(path):
            for image in images(doc):
                match = re.search(r"[:-]ray(\d+\.\d+\.\d+)", image)
                assert match, f"{path.relative_to(ROOT)}: image {image} has no ray<version> in its tag"
                versions[f"{path.name} {image}"] = match.group(1)
    for path in LAUNCHER.values():
        for command in launcher_commands(load_one(path)):
            for found in re.findall(r"ray\.__version__ == '([\d.]+)'", command):
                versions[f"{path.name} setup check"] = found
    for name, spec in cluster_specs().items():
        versions[f"{name} rayVersion"] = str(spec["rayVersion"])
    assert len(set(versions.values())) == 1, f"Ray versions differ: {versions}"
    version = Version(next(iter(versions.values())))
    installed = Version(importlib.metadata.version("ray"))
    assert (version.major, version.minor) == (installed.major, installed.minor), (
        f"manifests use Ray {version}, the package environment has {installed}"
    )
    assert version in requirement("ray").specifier, f"Ray {version} outside {requirement('ray')}"


def test_one_image_everywhere_tagged_with_the_package_version() -> None:
    """The launcher configs and the Kubernetes objects run one image: the fisher-scale image of cluster/Dockerfile,
    tagged <package version>-ray<version>-..."""
    found = {
        image for path in [*LAUNCHER.values(), *KUBERAY.glob("*.yaml")] for d in load_docs(path) for image in images(d)
    }
    assert len(found) == 1, f"the manifests name different images: {sorted(found)}"
    image = found.pop()
    repository, tag = image.rsplit(":", 1)
    assert repository.endswith("/fisher-scale"), image
    assert tag.startswith(pyproject()["project"]["version"] + "-"), f"{image}: tag must start with the package version"


def test_fisher_scale_commands_exist_in_the_cli() -> None:
    """Every `fisher-scale ...` the manifests and the walk-through run parses with the package's own argument parser
    (subcommand, options such as --set and --resume)."""
    from fisher_scale.cli import build_parser

    sources = all_fisher_scale_argvs()
    used = {argv[0] for argvs in sources.values() for argv in argvs if argv}
    assert {"tune", "scale", "compare"} <= used, f"the walk-through should run tune, scale and compare; found {used}"
    assert sources["rayjob-tune.yaml"] and sources["rayjob-scale.yaml"], "a RayJob entrypoint does not run fisher-scale"
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)
    problems = []
    for source, argvs in sources.items():
        for argv in argvs:
            if not argv or argv[0].startswith("-"):
                continue
            if argv[0] not in subcommands:
                problems.append(f"{source}: `fisher-scale {argv[0]}` is not a subcommand ({sorted(subcommands)})")
                continue
            try:
                parser.parse_args(argv)
            except SystemExit:
                problems.append(f"{source}: `fisher-scale {shlex.join(argv)}` does not parse")
    assert not problems, "\n".join(problems)


def test_named_configs_exist() -> None:
    """Every tune_configs/... file the manifests and the walk-through name is in the repository (absolute paths in
    RayJob entrypoints point into the image's copy of the checkout)."""
    named = {
        (source, token)
        for source, argvs in all_fisher_scale_argvs().items()
        for a in argvs
        for token in config_paths(a)
    }
    expected = {"study-gsm8k-qwen2.5-7b.yaml", "study-glue-qwen2.5-7b.yaml", "scale-qwen2.5.yaml"}
    assert expected <= {Path(token).name for _, token in named}
    missing = [f"{source}: {token}" for source, token in sorted(named) if not repo_config(token).is_file()]
    assert not missing, "configs named by cluster manifests do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("shape", ["aws", "gcp", "raycluster", "rayjob-tune", "rayjob-scale"])
def test_gpu_workers_hold_the_largest_trial(shape: str) -> None:
    """The GPU worker nodes of each cluster shape hold the most training workers a config it runs asks for (one GPU
    and distributed.cpus_per_worker CPUs each): RayJobs their entrypoint's config, the other clusters every config
    the walk-through submits to them."""
    sources = all_fisher_scale_argvs()
    if shape.startswith("rayjob-"):
        nodes = kuberay_nodes(cluster_specs()[shape])
        argvs = sources[f"{shape}.yaml"]
    else:
        spec = cluster_specs()["raycluster"] if shape == "raycluster" else None
        nodes = kuberay_nodes(spec) if spec else launcher_nodes(load_one(LAUNCHER[shape]))
        argvs = sources["README.md"]
    configs = {repo_config(token) for argv in argvs for token in config_paths(argv)}
    assert nodes and configs
    for config in sorted(configs):
        workers, cpus = demand(config)
        held = capacity(nodes, cpus)
        assert held >= workers, (
            f"{shape}: {config.relative_to(ROOT)} needs {workers} GPU workers of {cpus} CPUs, the worker nodes "
            f"(GPUs, CPUs, count) {nodes} hold {held}"
        )


def test_exposure_check_catches_open_rules() -> None:
    """The exposure check below flags what it must flag (so a pass there means something)."""
    bad = [
        {
            "IpPermissions": [
                {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
            ]
        },
        {
            "IpPermissions": [
                {"FromPort": 0, "ToPort": 65535, "IpProtocol": "tcp", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}
            ]
        },
        {"name": "fw", "sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["6000-7000"]}]},
        {"kind": "Service", "metadata": {"name": "mlflow"}, "spec": {"type": "LoadBalancer"}},
        {"headGroupSpec": {"serviceType": "NodePort"}},
    ]
    assert all(list(exposures(doc)) for doc in bad)
    fine = {
        "IpPermissions": [{"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    }
    assert not list(exposures(fine))


def test_nothing_opens_cluster_ports_beyond_the_cluster() -> None:
    """No security group / firewall rule opens 6379, 8265 or 5000 to 0.0.0.0/0, no public Kubernetes Service or
    Ingress, and the `ray up` dashboard listens on the head's loopback only (reached through `ray dashboard`)."""
    problems = [p for path in CLUSTER.rglob("*.yaml") for d in load_docs(path) for p in exposures(d, path.name)]
    for path in LAUNCHER.values():
        config = load_one(path)
        head_start = " ".join(config["head_start_ray_commands"])
        if "--dashboard-host" not in head_start or re.search(r"--dashboard-host[= ]0\.0\.0\.0", head_start):
            problems.append(f"{path.name}: the dashboard must listen on 127.0.0.1 (--dashboard-host=127.0.0.1)")
    for _, doc in k8s_docs():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
    for name, spec in cluster_specs().items():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", name
    assert not problems, "\n".join(problems)


def test_ray_token_authentication_is_on() -> None:
    """Ray token auth on every node: RAY_AUTH_MODE=token in the containers and the token file copied to every node
    (cluster launcher), authOptions.mode token (KubeRay, which generates the token)."""
    for path in LAUNCHER.values():
        config = load_one(path)
        docker = config["docker"]
        options = " ".join(docker.get("run_options", []))
        assert "RAY_AUTH_MODE=token" in options, f"{path.name}: RAY_AUTH_MODE=token missing from docker run_options"
        assert not docker.get("head_run_options") and not docker.get("worker_run_options")
        assert "~/.ray/auth_token" in config["file_mounts"].values(), f"{path.name}: the token is not copied to nodes"
    for name, spec in cluster_specs().items():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: authOptions.mode must be token"


def test_secrets_come_from_secrets() -> None:
    """No password, token or key is written into a manifest: Kubernetes containers take them from Secrets (envFrom /
    secretKeyRef), MLflow settings included; the example env file names every variable the MLflow server needs."""
    secret_name = re.compile(r"PASSWORD|TOKEN|SECRET|PGPASS|KEY", re.I)
    for path, doc in k8s_docs():
        for container in _containers(doc):
            for env in container.get("env", []):
                assert not (secret_name.search(env["name"]) and "value" in env), f"{path.name}: {env['name']} inline"
    server = (CLUSTER / "mlflow-server.sh").read_text()
    needed = set(re.findall(r"\$\{(\w+):\?", server))
    assert needed and needed <= env_names(SERVER_ENV), f"{SERVER_ENV.name} lacks {needed - env_names(SERVER_ENV)}"
    assert "--app-name basic-auth" in server


def env_names(path: Path) -> set[str]:
    """The variables an example env file sets."""
    return set(re.findall(r"^(\w+)=", path.read_text(), flags=re.M))


def _secret_refs(pod_spec: dict[str, Any]) -> set[str]:
    return {e["secretRef"]["name"] for c in pod_spec["containers"] for e in c.get("envFrom", []) if "secretRef" in e}


def test_each_component_gets_only_its_own_secrets() -> None:
    """Least privilege: Ray's processes get the MLflow trials' user (not admin) and the Optuna database user, never the
    MLflow server's database password, admin password or Flask key; the server gets its own and nothing of Ray's."""
    server_only = env_names(SERVER_ENV) - {"MLFLOW_TRIALS_USERNAME", "MLFLOW_TRIALS_PASSWORD"}
    assert not (env_names(RAY_ENV) & (server_only - {"PGPASSWORD"})), env_names(RAY_ENV) & server_only
    ray_env = dict(re.findall(r"^(\w+)=(.*)$", RAY_ENV.read_text(), flags=re.M))
    assert ray_env["MLFLOW_TRACKING_USERNAME"] != "admin"
    assert ray_env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")  # the server on the head's loopback
    for path in LAUNCHER.values():
        commands = launcher_commands(load_one(path))
        for command in commands:
            if "ray start" in command:
                assert RAY_ENV_FILE in command and SERVER_ENV_FILE not in command, f"{path.name}: {command}"
            if "mlflow-server.sh" in command:
                assert SERVER_ENV_FILE in command and RAY_ENV_FILE not in command, f"{path.name}: {command}"
        assert sum("mlflow-server.sh" in c for c in commands) == 1, path.name
    for name, spec in cluster_specs().items():
        refs = {pod: frozenset(_secret_refs(pod_spec)) for pod, pod_spec in pod_specs(spec).items()}
        assert set(refs.values()) == {frozenset({"fisher-scale-mlflow", "fisher-scale-optuna-db"})}, (name, refs)
    (deployment,) = [d for _, d in k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    assert _secret_refs(deployment["spec"]["template"]["spec"]) == {"fisher-scale-mlflow-server"}
    assert 'host="${MLFLOW_HOST:-127.0.0.1}"' in (CLUSTER / "mlflow-server.sh").read_text()


def test_network_policies_admit_only_the_components_that_talk() -> None:
    """KubeRay: MLflow answers the Ray head pods (the job drivers log the runs) on 5000 and nothing else; Ray pods
    answer each other, and on the dashboard port only the KubeRay operator's namespace and the RayJob submitters."""
    policies = {d["metadata"]["name"]: d["spec"] for _, d in k8s_docs() if d["kind"] == "NetworkPolicy"}
    mlflow = policies["fisher-scale-mlflow"]
    assert mlflow["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}
    assert mlflow["policyTypes"] == ["Ingress"]
    (rule,) = mlflow["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/node-type": "head"}}}]
    assert rule["ports"] == [{"port": 5000, "protocol": "TCP"}]
    ray = policies["fisher-scale-ray"]
    assert ray["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}} and ray["policyTypes"] == ["Ingress"]
    peers, dashboard = ray["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}]}
    assert dashboard["ports"] == [{"port": 8265, "protocol": "TCP"}]
    submitters = dashboard["from"][1]["podSelector"]["matchExpressions"][0]["values"]
    assert sorted(submitters) == sorted(load_one(path)["metadata"]["name"] for path in RAYJOBS.values())
    labels = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] for _, d in k8s_docs()
              if d["kind"] == "Deployment"}  # fmt: skip
    assert labels == {"mlflow"}


def _containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container of a Kubernetes object, at any depth."""
    for key, value in doc.items():
        if key == "containers" and isinstance(value, list):
            yield from value
        elif isinstance(value, dict):
            yield from _containers(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    yield from _containers(item)


def test_kuberay_objects_and_shared_volume() -> None:
    """RayCluster and RayJobs are ray.io/v1 objects of the expected kind; a RayJob has an entrypoint and either a
    rayClusterSpec or a clusterSelector; GPU groups ask for nvidia.com/gpu; the head and every worker group mount the
    same ReadWriteMany claim at the same path, and the configs' local storage_path lies on it."""
    assert load_one(KUBERAY / "raycluster.yaml")["apiVersion"] == "ray.io/v1"
    assert load_one(KUBERAY / "raycluster.yaml")["kind"] == "RayCluster"
    for path in RAYJOBS.values():
        job = load_one(path)
        assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob"), path.name
        assert job["spec"]["entrypoint"].strip()
        assert ("rayClusterSpec" in job["spec"]) != ("clusterSelector" in job["spec"]), path.name
    claims = {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    configs = {repo_config(t) for argvs in all_fisher_scale_argvs().values() for a in argvs for t in config_paths(a)}
    for name, spec in cluster_specs().items():
        mounts = {}
        for pod, pod_spec in pod_specs(spec).items():
            volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
            shared = {
                (volumes[m["name"]]["persistentVolumeClaim"]["claimName"], m["mountPath"])
                for c in pod_spec["containers"]
                for m in c.get("volumeMounts", [])
                if "persistentVolumeClaim" in volumes.get(m["name"], {})
            }
            assert len(shared) == 1, f"{name}/{pod}: expected one shared claim mount, found {shared}"
            mounts[pod] = shared.pop()
        assert len(set(mounts.values())) == 1, f"{name}: head and workers mount different storage {mounts}"
        claim, mount_path = next(iter(mounts.values()))
        assert claim in claims and "ReadWriteMany" in claims[claim]["spec"]["accessModes"], f"{name}: claim {claim}"
        assert kuberay_nodes(spec), f"{name}: no worker group with nvidia.com/gpu"
        for config in configs:
            if config.is_file():
                storage = str(yaml.safe_load(config.read_text()).get("distributed", {}).get("storage_path") or "")
                if storage.startswith("/"):
                    assert storage.startswith(mount_path + "/"), (
                        f"{config.name}: storage_path {storage} not on {mount_path}"
                    )


def test_launcher_nodes_share_storage_at_one_path() -> None:
    """`ray up` clusters mount the shared file system on the host of every node and into every container at the same
    path (one docker run option for head and workers)."""
    for path in LAUNCHER.values():
        config = load_one(path)
        volumes = [o.split()[1] for o in config["docker"]["run_options"] if o.startswith("-v ")]
        assert volumes, f"{path.name}: no shared volume in docker run_options"
        host, container = volumes[0].split(":")[:2]
        assert host == container, f"{path.name}: the shared file system must have one path everywhere"
        assert any("mount" in c and host in c for c in config["initialization_commands"]), (
            f"{path.name}: {host} unmounted"
        )


def test_walkthrough_covers_the_whole_path() -> None:
    """cluster/README.md goes from image to teardown on both paths, with port forwarding and resume."""
    code = "\n".join(readme_code())
    for step in (
        "docker build -f cluster/Dockerfile",
        "ray get-auth-token --generate",
        "ray up cluster/aws.yaml",
        "ray dashboard cluster/aws.yaml",
        "ray job submit --address http://localhost:8265",
        "--port-forward 5000",
        "optuna-dashboard",
        "--resume",
        "ray down cluster/aws.yaml",
        "kubectl apply -f cluster/kuberay/rayjob-tune.yaml",
        "kubectl port-forward svc/mlflow 5000:5000",
        "-f cluster/kuberay/network-policies.yaml",
    ):
        assert step in code, f"cluster/README.md does not show `{step}`"


def test_mlflow_server_script_listens_on_loopback_and_gives_trials_a_user_without_admin_rights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cluster/mlflow-server.sh run for real (SQLite stores and a local artifact folder instead of PostgreSQL and a
    bucket): it binds 127.0.0.1 only, and the trials' user it creates logs runs but cannot administer users."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import psutil
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "MLFLOW_PORT": str(port),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path}/auth.db",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32,
        "MLFLOW_TRIALS_USERNAME": "fisher-scale",
        "MLFLOW_TRIALS_PASSWORD": "trials-password-1",
    }
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        ["bash", str(CLUSTER / "mlflow-server.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "created the MLflow user fisher-scale" not in (tmp_path / "server.log").read_text():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        listening = {c.laddr.ip for p in tree for c in p.net_connections("inet") if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}, listening
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "fisher-scale")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "trials-password-1")
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("trials-own"))
        client.log_metric(run.info.run_id, "loss", 1.5, step=2)
        assert client.get_run(run.info.run_id).data.metrics == {"loss": 1.5}
        with pytest.raises(MlflowException, match=r"PERMISSION_DENIED|Permission denied"):
            get_app_client("basic-auth", tracking_uri=uri).create_user("intruder", "intruder-password-1")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
