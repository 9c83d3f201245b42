"""Scheduled retraining on Vertex AI Pipelines (KFP v2): preprocess -> check data -> train -> evaluate/promote.

Each step is a container component running the trainer image (deploy/trainer.Dockerfile) with one
phase of ``python -m pipelines.retrain`` (``--step``), so the workspace layout, the reuse of the
champion's label vocabulary, the stable split and the promotion gate live in one place - the same
code the single-machine cron job runs in one go. The steps share ``--run_id`` (the pipeline job
name) and hand over through the workspace, so each can run on the machine it needs. The pipeline
declares no option of its own: ``retrain_flags`` (a list of `pipelines.retrain` flags - preprocessing,
training and the promotion gate, with their defaults in one place) goes to the first step, which
records them in the run's folder for the others.

- preprocess: a small VM that launches the Beam job on Dataflow and waits for it (reusing the
  stored images of the workspace's newest dataset for unchanged sources, unless --full_rebuild);
- check-data: the data-health gate, new dataset against the champion's; a failure ends the run
  here, before any GPU is paid for, with the reason in history.jsonl;
- train: a GPU machine (MirroredStrategy uses every GPU on it);
- promote: evaluates challenger and champion on the same test split and promotes atomically.

Compile: ``python deploy/kfp/pipeline.py --image IMAGE [--output deploy/kfp/pipeline.yaml]``.
Run or schedule the YAML with deploy/kfp/schedule.py or the console (deploy/README.md).
"""
# No `from __future__ import annotations`: KFP reads the component signatures' real types.
import argparse
import os
from pathlib import Path

from kfp import compiler, dsl

PIPELINE_NAME = "tagbeam-retrain"
DEFAULT_OUTPUT = Path(__file__).with_name("pipeline.yaml")
# The trainer image keeps the source tree here (deploy/trainer.Dockerfile) so Beam can package it
# for Dataflow workers.
SETUP_FILE_IN_IMAGE = "/opt/tagbeam/src/setup.py"
RETRAIN = ["python", "-m", "pipelines.retrain"]
# A step that finds the workspace held by another run (a manual retrain, a retried pipeline) waits
# for it (up to --held_wait_s): skipping would leave the next step without its inputs.
IF_HELD = ["--if_held", "wait"]


def build_pipeline(image: str, accelerator_type: str = "NVIDIA_TESLA_T4", accelerator_count: int = 4,
                   train_cpu: str = "16", train_memory: str = "60G"):
    """The pipeline function for ``image``; machine shapes are fixed at compile time (Vertex maps
    the train step's CPU, memory and accelerator requests to a machine type)."""

    @dsl.container_component
    def preprocess(workspace: str, run_id: str, manifest: str, retrain_flags: list, project: str, region: str,
                   max_num_workers: int, machine_type: str) -> dsl.ContainerSpec:
        return dsl.ContainerSpec(
            image=image,
            command=RETRAIN,
            args=[
                "--step", "preprocess",
                "--workspace", workspace, "--run_id", run_id, *IF_HELD,
                "--input", manifest,
                # A list parameter reaches the container as one JSON string.
                "--flags_json", retrain_flags,
                # Everything below is a Beam pipeline option, forwarded to the Dataflow job.
                "--runner", "DataflowRunner",
                "--project", project, "--region", region,
                "--temp_location", f"{workspace}/dataflow/tmp",
                "--staging_location", f"{workspace}/dataflow/staging",
                "--setup_file", SETUP_FILE_IN_IMAGE,
                "--max_num_workers", max_num_workers,
                "--machine_type", machine_type,
            ],
        )

    def later_step(step: str, workspace: str, run_id: str) -> dsl.ContainerSpec:
        # Runs with the flags the preprocess step recorded for this run.
        return dsl.ContainerSpec(image=image, command=RETRAIN,
                                 args=["--step", step, "--workspace", workspace, "--run_id", run_id, *IF_HELD])

    @dsl.container_component
    def check_data(workspace: str, run_id: str) -> dsl.ContainerSpec:
        return later_step("check", workspace, run_id)

    @dsl.container_component
    def train(workspace: str, run_id: str) -> dsl.ContainerSpec:
        return later_step("train", workspace, run_id)

    @dsl.container_component
    def promote(workspace: str, run_id: str) -> dsl.ContainerSpec:
        return later_step("promote", workspace, run_id)

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.split("\n\n")[0])
    def retrain_pipeline(
        project: str,
        region: str,
        workspace: str,
        manifest: str,
        retrain_flags: list = [],  # noqa: B006 - KFP needs a literal default
        max_num_workers: int = 20,
        machine_type: str = "n1-standard-4",
    ) -> None:
        # The job name is unique per run: it names the run's folder in the workspace.
        run_id = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
        prep = preprocess(workspace=workspace, run_id=run_id, manifest=manifest, retrain_flags=retrain_flags,
                          project=project, region=region, max_num_workers=max_num_workers, machine_type=machine_type)
        healthy = check_data(workspace=workspace, run_id=run_id).after(prep)
        fit = train(workspace=workspace, run_id=run_id).after(healthy)
        fit.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
        fit.set_cpu_limit(train_cpu).set_memory_limit(train_memory)
        gate = promote(workspace=workspace, run_id=run_id).after(fit)
        # A scheduled run sees the same parameters every time while the manifest's content changes:
        # a cached step would silently skip the new data.
        for task in (prep, healthy, fit, gate):
            task.set_caching_options(False)

    return retrain_pipeline


def compile(path: str | os.PathLike[str] = DEFAULT_OUTPUT, image: str | None = None, **machine) -> str:  # noqa: A001
    """Compile the pipeline to a KFP v2 YAML at ``path``; ``image`` defaults to $TAGBEAM_TRAINER_IMAGE."""
    image = image or os.environ.get("TAGBEAM_TRAINER_IMAGE")
    if not image:
        raise ValueError("no trainer image: pass --image (or set TAGBEAM_TRAINER_IMAGE) to the image pushed "
                         "from deploy/trainer.Dockerfile, e.g. REGION-docker.pkg.dev/PROJECT/tagbeam/trainer:TAG")
    compiler.Compiler().compile(pipeline_func=build_pipeline(image, **machine), package_path=str(path))
    return str(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python deploy/kfp/pipeline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=os.environ.get("TAGBEAM_TRAINER_IMAGE"),
                   help="trainer image URI (default: $TAGBEAM_TRAINER_IMAGE)")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT), help="compiled pipeline YAML")
    p.add_argument("--accelerator_type", default="NVIDIA_TESLA_T4", help="GPU type of the train step")
    p.add_argument("--accelerator_count", type=int, default=4, help="GPUs of the train step (one machine)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = compile(args.output, args.image, accelerator_type=args.accelerator_type,
                       accelerator_count=args.accelerator_count)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"compiled {PIPELINE_NAME} to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
