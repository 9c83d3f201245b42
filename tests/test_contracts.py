"""The contracts both sides import (tagbeam/): docs/dataset.md stays true to them, dataset.json and
labels.txt round-trip, and every option group parses, checks and forwards from its one declaration."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from pipelines import options_reference
from pipelines.fetch import FetchOptions
from pipelines.health import HealthOptions
from pipelines.images import ImageOptions
from pipelines.options import LabelOptions, SplitOptions
from pipelines.reuse import ReuseOptions
from tagbeam import dataset, flags
from trainer.config import TaskOptions, TrainOptions

DOCS = (Path(__file__).resolve().parents[1] / "docs" / "dataset.md").read_text()
# options_reference imports every entry point, so every option group is registered by now.
GROUPS = flags.registered()


def _doc_json_example() -> dict:
    block = re.search(r"## `dataset.json`\n```json\n(.*?)```", DOCS, re.S).group(1)
    return json.loads(block)


def _info() -> dataset.DatasetInfo:
    labels = ("cat", "dog")
    split = dataset.SplitInfo(3, 1, ("train-00000-of-00001.tfrecord",), 300, {"cat": 2, "dog": 1})
    return dataset.DatasetInfo(labels=labels, image_size=64, image_format="jpeg", resize_policy="pad",
                               splits={"train": split}, jpeg_quality=90, jpeg_subsampling="4:2:0",
                               shard_compression="none", input_rows=4, rejected=1,
                               rejected_by_reason={"fetch:http_404": 1},
                               rejected_files=("rejected-00000-of-00001.jsonl",), options={"input": "m.csv"},
                               created="2026-11-30T00:00:00Z")


def test_docs_dataset_json_example_has_exactly_the_fields_of_dataset_info():
    example = _doc_json_example()
    written = _info().to_json()
    assert set(example) == set(written), f"docs/dataset.md and DatasetInfo differ: {set(example) ^ set(written)}"
    assert set(example["splits"]["train"]) == set(written["splits"]["train"])
    assert example["format_version"] == dataset.FORMAT_VERSION


def test_docs_name_every_enum_file_and_feature_of_the_contract():
    for value in (*dataset.IMAGE_FORMATS, *dataset.RESIZE_POLICIES, *dataset.JPEG_SUBSAMPLINGS,
                  *dataset.SHARD_COMPRESSIONS, *dataset.REJECTION_STAGES, *dataset.UNLABELED_POLICIES):
        assert f"`{value}`" in DOCS or f'"{value}"' in DOCS, f"docs/dataset.md does not mention {value!r}"
    for name in (dataset.DATASET_JSON, dataset.LABELS_TXT, dataset.TRANSFORM_OUTPUT, dataset.OUTPUT_MARKER,
                 dataset.shard_name("train", 0, 3), *dataset.SHARD_SUFFIXES.values()):
        assert name in DOCS, name
    for key in (dataset.FEATURE_ID, dataset.FEATURE_IMAGE, dataset.FEATURE_LABELS):
        assert f"| `{key}` |" in DOCS
    assert "`DRAFT_MARGIN`" in DOCS and "2x the target" in DOCS and dataset.DRAFT_MARGIN == 2
    rejection = json.loads(re.search(r"One object per rejected row: `(\{.*?\})`", DOCS, re.S).group(1))
    assert set(rejection) == set(dataset.Rejection._fields)


def test_dataset_info_round_trips_and_reads_older_datasets():
    info = _info()
    assert dataset.DatasetInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    legacy = {k: v for k, v in info.to_json().items() if k not in ("shard_compression", "jpeg_subsampling")}
    old = dataset.DatasetInfo.from_json(legacy)
    assert (old.shard_compression, old.jpeg_subsampling, old.compression_type) == ("gzip", "4:4:4", "GZIP")
    assert old.label_count_vector("train") == [2, 1] and old.label_count_vector("test") == [0, 0]
    with pytest.raises(dataset.DatasetError, match="resize_policy 'stretch' is not one of"):
        dataset.DatasetInfo.from_json({**info.to_json(), "resize_policy": "stretch"}, "x/dataset.json")
    with pytest.raises(dataset.DatasetError, match="num_labels=3 but 2 labels"):
        dataset.DatasetInfo.from_json({**info.to_json(), "num_labels": 3})


def test_labels_txt_has_one_rule_for_writers_and_readers():
    assert dataset.parse_labels_text(dataset.labels_text(["a b", "Sci-Fi", "ß"])) == ["a b", "Sci-Fi", "ß"]
    assert dataset.parse_labels_text("a\n\n  b \n") == ["a", "b"]  # a user's --vocab_file may be padded
    for bad in ("two\nlines", "carriage\rreturn", " padded", "", "para\u2029graph"):
        with pytest.raises(ValueError, match="label"):
            dataset.labels_text(["ok", bad])


def test_rejection_record_round_trips():
    record = dataset.Rejection("m.csv", 3, "id", "http://x", "fetch", "http_404", "HTTP 404")
    assert dataset.Rejection.from_json(record.to_json()) == record and record.key == "fetch:http_404"


def _non_default(o: flags.Declared):
    if o.kind is bool:
        return True
    if o.choices:
        return next(c for c in o.choices if c != o.default)
    if o.kind is str:
        return f"value-of-{o.flag}"
    base = o.default if o.default not in (None, dataclasses.MISSING) else 1
    return type(base)(base / 2) if o.kind is float else int(base) + 1


def test_the_registry_holds_every_group_and_every_group_has_an_entry_point():
    assert {HealthOptions, ReuseOptions, TrainOptions, TaskOptions} <= set(GROUPS) and len(GROUPS) >= 12
    taken = {p.group for job in options_reference.ENTRY_POINTS.values() for p in flags.parts(job)}
    assert taken == set(GROUPS), f"option groups no entry point takes: {set(GROUPS) - taken}"


def _wrong_type(o: flags.Declared):
    return "yes" if o.kind is bool else 3 if o.kind is str else "3"


# Values a declared check or a choice list refuses (every check in the code base refuses one of them).
_OUT_OF_RANGE = (-1, 0, -0.5, 1.5, 10**9, float("nan"), "not-a-choice")


def _required(group) -> dict:
    return {o.name: f"value-of-{o.flag}" for o in flags.declared(group) if o.required}


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__)
def test_every_option_group_refuses_invalid_values_built_in_code(group):
    """The same checks as the flags, for an object built in code (a notebook, retrain, a test)."""
    for o in flags.declared(group):
        with pytest.raises(ValueError, match=f"^--{o.flag} expected {o.kind.__name__}"):
            group(**{**_required(group), o.name: _wrong_type(o)})
        if not o.optional and not o.required:
            with pytest.raises(ValueError, match=f"^--{o.flag} must be given a value"):
                group(**{**_required(group), o.name: None})
        if o.check or o.choices:
            refused = []
            for value in _OUT_OF_RANGE:
                if o.type_problem(value) is None:
                    try:
                        group(**{**_required(group), o.name: value})
                    except ValueError as err:
                        assert str(err).startswith(f"--{o.flag} "), err
                        refused.append(value)
            assert refused, f"--{o.flag} accepted every one of {_OUT_OF_RANGE}"


def test_value_checks_cannot_be_skipped_by_a_group():
    with pytest.raises(ValueError, match="--learning_rate must be > 0, got -1"):
        TrainOptions(learning_rate=-1)
    with pytest.raises(ValueError, match="--min_label_count must be > 0, got 0"):
        LabelOptions(min_label_count=0)
    with pytest.raises(ValueError, match="--positive_weights applies to --loss bce only"):
        TrainOptions(positive_weights=True, loss="soft_f1")  # the group's own validate() runs after the fields'
    with pytest.raises(TypeError, match="validate"):
        @flags.group
        class Skips:
            size: int = flags.option(1, check=flags.positive, help="h")

            def __post_init__(self) -> None:
                pass


def test_help_says_each_default_once():
    parser = flags.Parser()
    flags.add_options(parser, TaskOptions)
    flags.add_options(parser, TrainOptions)
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        shown = formatter._get_help_string(action) or ""
        assert shown.replace("%(default)s", "").count("default") <= 1, shown
    assert "--version INT export version folder under model_dir/export/ (default: an increasing timestamp)" in text
    assert "--batch_size INT GLOBAL batch size, split across the replicas (default: 256)" in text


def test_docs_options_md_is_generated_from_the_declarations():
    rendered = options_reference.render()
    assert options_reference.PATH.read_text() == rendered, (
        "docs/options.md is stale: run `python -m pipelines.options_reference`")
    for group in GROUPS:
        for o in flags.declared(group):
            assert f"`--{o.flag}`" in rendered


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__)
def test_every_option_group_forwards_what_it_parses(group, monkeypatch):
    monkeypatch.delenv("AIP_MODEL_DIR", raising=False)
    parser = flags.Parser()
    flags.add_options(parser, group)
    declared = flags.declared(group)
    values = {o.name: _non_default(o) for o in declared}
    if group is TrainOptions:
        values["loss"] = "bce"  # --positive_weights applies to bce only (checked by the group)
    if group is SplitOptions:
        values.update(val_fraction=0.3, test_fraction=0.2)
    options = group(**values)
    parsed = flags.build(group, parser.parse_args(flags.to_argv(options)))
    assert parsed == options
    assert flags.to_argv(flags.build(group, parser.parse_args(flags.to_argv(options)))) == flags.to_argv(options)


def test_option_values_are_checked_from_the_declaration(capsys):
    parser = flags.Parser()
    flags.add_options(parser, FetchOptions)
    for argv, message in ((["--fetch_backoff_s", "nan"], "must be a finite number"),
                          (["--fetch_timeout_s", "inf"], "must be a finite number"),
                          (["--max_redirects", "-1"], "must be >= 0"),
                          (["--fetch_concurrency", "two"], "expected int")):
        with pytest.raises(SystemExit) as done:
            parser.parse_args(argv)
        assert done.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match="--fetch_timeout_s must be > 0"):
        FetchOptions(timeout_s=0)  # the same rule for options built in code
    with pytest.raises(ValueError, match=r"--image_size must be in \[1, 4096\], got 100000"):
        ImageOptions(size=100_000)  # refused up front, not a MemoryError mid-run
    with pytest.raises(ValueError, match="sum to at most 1"):
        SplitOptions(val_fraction=0.6, test_fraction=0.6)


def test_env_supplies_a_required_default(monkeypatch):
    parser = flags.Parser()
    flags.add_options(parser, TaskOptions)
    with pytest.raises(flags.UsageError, match=r"--model_dir is required when \$AIP_MODEL_DIR is not set"):
        flags.build(TaskOptions, parser.parse_args(["--data_dir", "d"]))
    monkeypatch.setenv("AIP_MODEL_DIR", "gs://b/model")
    parser = flags.Parser()
    flags.add_options(parser, TaskOptions)
    assert flags.build(TaskOptions, parser.parse_args(["--data_dir", "d"])).model_dir == "gs://b/model"


def test_beam_options_pass_and_anything_else_is_named():
    beam, rest = flags.split_beam_args(["--runner", "DataflowRunner", "--project=p", "--dropout", "0.1",
                                        "--max_num_workers", "3", "--save_main_session"])
    assert beam == ["--runner", "DataflowRunner", "--project=p", "--max_num_workers", "3", "--save_main_session"]
    assert rest == ["--dropout", "0.1"]


def test_stored_images_owns_its_checks_json_and_codec():
    """tagbeam.stored.StoredImages: the one owner of how images are stored (docs/dataset.md)."""
    import io

    import numpy as np
    from PIL import Image

    from pipelines.images import ImageOptions
    from tagbeam.stored import StoredImages

    jpeg = ImageOptions(size=16, jpeg_quality=90).stored
    assert jpeg == StoredImages(16, "jpeg", "squash", 90, "4:2:0") and jpeg.jpeg == (90, "4:2:0")
    assert StoredImages.from_json(json.loads(json.dumps(jpeg.to_json()))) == jpeg
    assert _info().stored_images == StoredImages.from_json(_info().to_json())  # dataset.json holds the same fields
    assert ImageOptions(max_pixels=7).storing(jpeg).stored == jpeg  # predict: an export's format, its own bounds
    for bad, message in (({"image_size": 0}, "image_size must be an int in"), ({"jpeg_quality": 101}, "jpeg_quality"),
                         ({"image_format": "webp"}, "image_format 'webp' is not one of"),
                         ({"jpeg_subsampling": "4:1:1"}, "jpeg_subsampling")):
        with pytest.raises(ValueError, match=message):
            StoredImages(**{**jpeg.to_json(), **bad})
    with pytest.raises(ValueError, match="has no 'resize_policy'"):
        StoredImages.from_json({"image_size": 16, "image_format": "png"})
    # What the pipeline writes is what the trainer and the serving signatures decode, pixel for pixel.
    ramp = np.arange(16, dtype=np.uint8) * 16
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), axis=-1)
    for stored in (jpeg, StoredImages(16, "png", "pad", 95, "4:4:4")):
        data = stored.encode(Image.fromarray(pixels))
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(stored.decode(data).numpy(), expected)
        through = stored.through_codec(pixels.astype("float32") / 255.0).numpy()
        assert through.dtype == np.uint8 and through.shape == (16, 16, 3)
        if stored.jpeg is None:
            np.testing.assert_array_equal(through, pixels)
        else:
            # Serving's round trip carries the stored JPEG's error, not the source's pixels.
            assert np.abs(through.astype(int) - expected).mean() < 1 < np.abs(through.astype(int) - pixels).sum()
