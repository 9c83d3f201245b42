"""Installable package for the multi-label image classification system.

The same file is Dataflow's ``--setup_file``: workers install it so that every DoFn
lives in an importable module rather than in ``__main__``.
"""
import setuptools

# Ranges that resolve together on Python 3.11, 3.12 and 3.13 (see ../shared/notes/stack.md): tfx-bsl
# 1.21 pins TensorFlow to 2.21.x, and Beam 2.77 caps pyarrow, numpy and pillow. No setuptools cap:
# tensorflow-hub's one use of pkg_resources is bridged in trainer/hub.py.
REQUIRED = [
    "tensorflow>=2.21,<2.22",
    "tf-keras>=2.21,<2.22",
    # tf_keras' TensorBoard callback needs it and TensorFlow 2.21 no longer pulls it in.
    "tensorboard>=2.21,<2.22",
    "tensorflow-hub==0.16.1",
    # trainer/hub.py gives tensorflow-hub packaging's version parser where setuptools 81+ has no pkg_resources.
    "packaging>=22",
    "tensorflow-transform>=1.21,<1.22",
    "apache-beam[gcp]>=2.77,<2.78",
    "google-cloud-storage>=3.0,<4",
    # TFRecord checksums of the shard writer.
    "google-crc32c>=1.5",
    "pyarrow>=18,<26",
    "pillow>=12.1.1,<13",
    "numpy>=1.26,<2.5",
    # 16-bit and 4-band TIFF chips (Planet) that Pillow cannot open.
    "tifffile>=2023.1",
    # The downloader streams bodies with a byte bound (urllib3 2.3+ read semantics).
    "urllib3>=2.3,<3",
    # The evaluation report writes PNG plots.
    "matplotlib>=3.8",
]

EXTRAS = {
    # The demo's sample-data builder (sample_data/, not installed: Dataflow workers never need it)
    # reads the real BigEarthNet patches shipped as LMDB.
    "demo": ["lmdb>=1.4"],
    "test": [
        "pytest>=8",
        # Property-based fuzzing of the per-row code (tests/test_fuzz_rows.py).
        "hypothesis>=6",
        # The downloader's TLS test makes a self-signed certificate.
        "cryptography",
        "gcp-storage-emulator>=2024.8.3",
        "scikit-learn>=1.5",
        "scikit-image>=0.24",
        # tests/test_deploy.py compiles the Vertex AI Pipelines definition.
        "kfp>=2.17,<3",
        # tests/test_lint.py: ruff.toml's rules (import order, bugbear, pyupgrade); a minor release may add findings.
        "ruff>=0.17,<0.18",
        # Drives the system's headless Chromium (Debian chromium + chromium-driver) for the report pages.
        "selenium>=4.20",
    ],
}

setuptools.setup(
    name="tagbeam",
    version="0.1.0",
    description="Multi-label image classification at scale: Beam preprocessing, TF training, servable models.",
    # Every supported version is tested in CI: the suite on 3.11, scripts/smoke.sh on 3.13.
    python_requires=">=3.11,<3.14",
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
    packages=setuptools.find_packages(include=["tagbeam", "tagbeam.*", "pipelines", "pipelines.*", "trainer", "trainer.*"]),
    package_data={"trainer": ["imagenet_classes.txt"], "tagbeam": ["page_assets/*"]},
    install_requires=REQUIRED,
    extras_require=EXTRAS,
)
