"""Creates a Vertex AI Pipelines schedule for the compiled retraining pipeline (deploy/kfp/pipeline.py).

Needs ``pip install google-cloud-aiplatform`` and application-default credentials; it is imported
only when a schedule is created, so the project does not depend on it and this cannot run (or be
tested) without GCP. Example (weekly, Mondays 03:00 Paris time):

    python deploy/kfp/schedule.py --project my-project --region us-central1 \\
      --template deploy/kfp/pipeline.yaml --pipeline_root gs://my-bucket/tagbeam/pipeline-root \\
      --workspace gs://my-bucket/tagbeam/workspace --manifest gs://my-bucket/tagbeam/MovieGenre.csv \\
      --retrain_flags '["--format", "movie_genre", "--min_metric", "0.2"]' \\
      --cron "TZ=Europe/Paris 0 3 * * 1" --service_account tagbeam@my-project.iam.gserviceaccount.com

--retrain_flags are `python -m pipelines.retrain` flags (preprocessing, training, promotion gate),
checked here by retrain's own parser before anything is scheduled, so a typo fails now rather
than at 03:00 on Monday.
"""
import argparse
import json
from typing import Any


def create_schedule(project: str, region: str, template: str, pipeline_root: str, parameters: dict[str, Any],
                    cron: str, display_name: str = "tagbeam-retrain", service_account: str | None = None) -> Any:
    """Create the schedule and return aiplatform's ``PipelineJobSchedule``."""
    from google.cloud import aiplatform

    aiplatform.init(project=project, location=region)
    job = aiplatform.PipelineJob(
        display_name=display_name,
        template_path=template,
        pipeline_root=pipeline_root,
        parameter_values=parameters,
        # New data arrives under the same manifest path: a cached step would reuse last week's output.
        enable_caching=False,
    )
    # One scheduled run at a time; a manual run or a retry meanwhile meets the workspace lease
    # (pipelines.retrain --if_held).
    return job.create_schedule(cron=cron, display_name=display_name, max_concurrent_run_count=1,
                               service_account=service_account)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python deploy/kfp/schedule.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--project", required=True, help="GCP project id")
    p.add_argument("--region", required=True, help="Vertex AI region, e.g. us-central1")
    p.add_argument("--template", default="deploy/kfp/pipeline.yaml", help="compiled pipeline YAML")
    p.add_argument("--pipeline_root", required=True, help="gs:// folder for Vertex AI Pipelines' own outputs")
    p.add_argument("--workspace", required=True, help="retraining workspace (gs://), as for pipelines.retrain")
    p.add_argument("--manifest", required=True, help="the current manifest (gs://), re-read at every run")
    p.add_argument("--retrain_flags", type=_retrain_flags, default=[],
                   help='JSON list of pipelines.retrain flags for every run, e.g. \'["--format", "movie_genre"]\'')
    p.add_argument("--cron", default="0 3 * * 1",
                   help='cron expression, optionally prefixed "TZ=Area/City " (default: Mondays 03:00 UTC)')
    p.add_argument("--service_account", default=None,
                   help="service account the runs use (needs Dataflow, Vertex AI and bucket access)")
    p.add_argument("--display_name", default="tagbeam-retrain")
    return p


def _retrain_flags(text: str) -> list[str]:
    """A JSON list of strings that pipelines.retrain accepts (its parser exits 2 on a bad flag)."""
    from pipelines import retrain

    try:
        flags = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise argparse.ArgumentTypeError("give a JSON list of strings")
    retrain.parse_args(["--workspace", "gs://check/only", *flags])
    return flags


def pipeline_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The compiled pipeline's input values; the others keep their defaults (deploy/kfp/pipeline.py)."""
    return {"project": args.project, "region": args.region, "workspace": args.workspace,
            "manifest": args.manifest, "retrain_flags": args.retrain_flags}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    schedule = create_schedule(args.project, args.region, args.template, args.pipeline_root, pipeline_parameters(args),
                               args.cron, args.display_name, args.service_account)
    print(f"created schedule {schedule.resource_name} ({args.cron})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
