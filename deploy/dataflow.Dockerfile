# Optional custom Dataflow worker image: the project and its dependencies (TensorFlow,
# tensorflow-transform, ...) preinstalled, so workers start in seconds instead of pip-installing
# them from --setup_file on every VM. Build from the repository root:
#   docker build -f deploy/dataflow.Dockerfile -t "$WORKER_IMAGE" .
# and pass --sdk_container_image="$WORKER_IMAGE" instead of --setup_file (deploy/README.md).
# The base image's Beam and Python must equal what the launching machine runs (setup.py pins Beam 2.77).
FROM apache/beam_python3.11_sdk:2.77.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/tagbeam/src
COPY setup.py README.md ./
COPY pipelines ./pipelines
COPY trainer ./trainer
COPY tagbeam ./tagbeam
RUN pip install . \
 && python -c "import apache_beam, pipelines, tagbeam, trainer; assert apache_beam.__version__.startswith('2.77.'), apache_beam.__version__"
# The base image's ENTRYPOINT (/opt/apache/beam/boot, the SDK worker harness) is kept on purpose.
