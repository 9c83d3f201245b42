"""Where the workers run decides which paths a job may use (pipelines/runners.py), and a path Beam
has no file system for is one `error:` line - for every entry point that runs Beam."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import predict, preprocess, retrain, runners
from tagbeam.flags import UsageError

# (Beam options, the flag the refusal must name; None: the workers run on this machine)
PLACEMENTS = [
    ([], None),
    (["--runner", "DirectRunner"], None),
    (["--runner", "BundleBasedDirectRunner"], None),
    (["--runner", "PrismRunner"], None),
    (["--runner", "DataflowRunner", "--project", "p", "--region", "r"], "--runner DataflowRunner"),
    (["--runner", "PortableRunner", "--job_endpoint", "embed", "--environment_type", "EXTERNAL",
      "--environment_config", "localhost:50000"], None),
    (["--runner", "PortableRunner", "--job_endpoint", "embed", "--environment_type", "LOOPBACK"], None),
    (["--runner", "PortableRunner", "--job_endpoint", "127.0.0.1:8099", "--environment_type", "PROCESS",
      "--environment_config", '{"command": "/opt/apache/beam/boot"}'], None),
    (["--runner", "PortableRunner", "--job_endpoint", "[::1]:8099", "--environment_type", "LOOPBACK"], None),
    (["--runner", "PortableRunner", "--job_endpoint", "flink-jobserver.internal:8099", "--environment_type",
      "LOOPBACK"], "--job_endpoint flink-jobserver.internal:8099"),
    (["--runner", "PortableRunner", "--job_endpoint", "embed", "--environment_type", "EXTERNAL",
      "--environment_config", "10.1.2.3:50000"], "--environment_config 10.1.2.3:50000"),
    # Beam's default environment for a portable runner is Docker: containers see none of our folders.
    (["--runner", "PortableRunner", "--job_endpoint", "embed"], "--environment_type DOCKER"),
    (["--runner", "FlinkRunner"], None),
    (["--runner", "FlinkRunner", "--flink_master", "[local]"], None),
    (["--runner", "FlinkRunner", "--flink_master", "[auto]"], None),
    (["--runner", "FlinkRunner", "--flink_master", "flink.internal:8081"], "--flink_master flink.internal:8081"),
    (["--runner", "SparkRunner"], None),
    (["--runner", "SparkRunner", "--spark_master_url", "local[2]"], None),
    (["--runner", "SparkRunner", "--spark_master_url", "spark://spark.internal:7077"],
     "--spark_master_url spark://spark.internal:7077"),
]


@pytest.mark.parametrize("beam_args,flag", PLACEMENTS, ids=[" ".join(a) or "default" for a, _ in PLACEMENTS])
def test_workers_run_where_the_options_say(beam_args, flag):
    reason = runners.workers_elsewhere(PipelineOptions(beam_args))
    if flag is None:
        assert reason is None
    else:
        assert reason and reason.startswith(flag), reason


def test_an_unknown_runner_is_a_usage_error():
    with pytest.raises(UsageError, match="--runner NoSuchRunner"):
        runners.workers_elsewhere(PipelineOptions(["--runner", "NoSuchRunner"]))


def _error(code: int, capsys) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _entry_points(tmp_path) -> dict:
    """Each entry point's main and its arguments but the Beam options, with `{where}` the folder it writes."""
    return {
        "preprocess": (preprocess.main, ["--input", "gs://bucket/manifest.csv", "--output", "{where}"]),
        "predict": (predict.main, ["--input", "gs://bucket/manifest.csv", "--model", "gs://bucket/model",
                                   "--output", "{where}"]),
        "retrain": (retrain.main, ["--input", "gs://bucket/manifest.csv", "--workspace", "{where}"]),
    }


def _call(main, argv: list[str], where: str, beam_args: list[str]) -> int:
    return main([where if a == "{where}" else a for a in argv] + beam_args)


ENTRY_POINTS = ("preprocess", "predict", "retrain")


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_local_folder_with_dataflow_is_refused_before_any_cloud_call(entry_point, tmp_path, capsys):
    main, argv = _entry_points(tmp_path)[entry_point]
    where = tmp_path / "out"
    # The session fails if anything tries to reach Google (tests/conftest.py guards the network).
    err = _error(_call(main, argv, str(where), ["--runner", "DataflowRunner", "--project", "p", "--region", "r",
                                                "--temp_location", "gs://bucket/tmp"]), capsys)
    assert f"{where} is on this machine" in err and "--runner DataflowRunner runs the workers on Google Cloud" in err
    assert not where.exists()


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("beam_args", [
    ["--runner", "PortableRunner", "--job_endpoint", "embed", "--environment_type", "EXTERNAL",
     "--environment_config", "localhost:50000"],
    ["--runner", "FlinkRunner", "--flink_master", "[local]"],
], ids=["portable-embed", "flink-local"])
def test_a_local_folder_with_workers_on_this_machine_is_accepted(entry_point, beam_args, tmp_path, capsys):
    """The job goes past the rule to the next thing it checks: a local manifest or model that does not exist."""
    main, argv = _entry_points(tmp_path)[entry_point]
    missing = str(tmp_path / "missing.csv")
    argv = [missing if a == "gs://bucket/manifest.csv" else a for a in argv]
    if entry_point == "predict":
        argv = [str(tmp_path / "no-model") if a == "gs://bucket/model" else a for a in argv]
    if entry_point == "retrain":
        argv += ["--step", "check"]  # stops at once: no run to check yet
    code = _call(main, argv, str(tmp_path / "out"), beam_args)
    err = capsys.readouterr().err
    assert "on this machine, which the job's workers cannot reach" not in err
    if entry_point == "retrain":
        assert code == 1 and "no runs under" in err, err
    else:
        assert code == 2 and ("no such file" in err or "no SavedModel there" in err), err


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_remote_flink_master_refuses_a_local_folder(entry_point, tmp_path, capsys):
    main, argv = _entry_points(tmp_path)[entry_point]
    err = _error(_call(main, argv, str(tmp_path / "out"), ["--runner", "FlinkRunner", "--flink_master",
                                                           "flink.internal:8081"]), capsys)
    assert "--flink_master flink.internal:8081 is a Flink cluster on another machine" in err


def _installed() -> str:
    return ", ".join(["local paths", *(f"{s}://" for s in runners.installed_schemes())])


def test_installed_schemes_come_from_beams_registry():
    installed = runners.installed_schemes()
    assert "gs" in installed  # apache-beam[gcp] is a dependency of the project
    assert "hdfs" not in installed  # Beam registers it, but its client is not installed here


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("path,expected", [
    ("hdfs://namenode/data/out", "needs hdfs, which is not installed: pip install 'apache-beam[hadoop]' and "
                                 "--hdfs_host"),
    ("s3://bucket/out", "needs boto3, which is not installed: pip install 'apache-beam[aws]'"),
    ("azfs://account/container/out", "needs azure-storage-blob, which is not installed: "
                                     "pip install 'apache-beam[azure]'"),
    ("ftp://host/out", "Beam has no file system for ftp://"),
], ids=["hdfs", "s3", "azfs", "ftp"])
def test_a_scheme_beam_cannot_use_is_one_error_line(entry_point, path, expected, tmp_path, capsys):
    main, argv = _entry_points(tmp_path)[entry_point]
    err = _error(_call(main, argv, path, []), capsys)
    flag = "--workspace" if entry_point == "retrain" else "--output"
    assert err.startswith(f"error: {flag} {path}: ") and expected in err and _installed() in err


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_file_url_names_the_plain_path(entry_point, tmp_path, capsys):
    main, argv = _entry_points(tmp_path)[entry_point]
    where = tmp_path / "out"
    err = _error(_call(main, argv, f"file://{where}", []), capsys)
    assert err.rstrip().endswith(f"give {where}") and not where.exists()


def test_an_input_scheme_is_checked_as_its_flag_from_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipelines.predict", "--input", "s3://bucket/new.csv", "--model",
                           str(tmp_path), "--output", str(tmp_path / "out")], capture_output=True, text=True,
                          check=False, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --input s3://bucket/new.csv: Beam's s3:// file "
                                                           "system needs boto3")
    assert "Traceback" not in done.stderr
