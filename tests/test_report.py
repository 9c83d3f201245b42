"""report.html of a trained model, in headless Chromium: loads offline, curves, threshold control, gallery, escaping.

The model is trained in-process by `trainer.task` on a small synthetic dataset with the tiny
mean-pooled backbone (which exports spatial features, so the gallery has class activation maps),
with one label named like an XSS probe and one with quotes.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tagbeam import dataset
from tagbeam import export as model_files
from trainer import model as model_lib
from trainer import report, task
from trainer.evaluation import evaluate

from backbone_factory import write_backbone
from browser import load, screenshot
from dataset_factory import write_dataset

HOSTILE = "<img src=x onerror=alert(1)>"
QUOTED = "say \"hi\" it's"
LABELS = ["circle", HOSTILE, QUOTED, "cross"]


@pytest.fixture(scope="module")
def mean_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_backbone(str(tmp_path_factory.mktemp("backbone") / "tiny-mean"), pooling="mean")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mean_backbone: str) -> str:
    root = tmp_path_factory.mktemp("report")
    data_dir = write_dataset(str(root / "ds"), {"train": 96, "val": 32, "test": 40}, 32, LABELS, seed=5)
    model_dir = str(root / "model")
    code = task.main(["--data_dir", data_dir, "--model_dir", model_dir, "--hub_handle", mean_backbone, "--epochs", "20",
                      "--batch_size", "16", "--learning_rate", "0.05", "--seed", "3"])
    assert code == 0
    return model_dir


def _scored(model_dir: str) -> report.Scored:
    with open(os.path.join(model_dir, model_files.TEST_SCORES_NPZ), "rb") as f:
        return report.Scored.from_npz(f.read())


def test_the_page_loads_offline_with_curves_threshold_control_and_gallery(trained, browser) -> None:
    page = os.path.join(trained, model_files.REPORT_HTML)
    assert os.path.exists(page)
    problems, requests = load(browser, page)
    assert problems == [] and requests == []
    scored = _scored(trained)
    assert list(scored.ids) == [f"test-{i}" for i in range(40)] or len(set(scored.ids)) == 40
    _, thresholds = model_files.parse_thresholds_json(open(os.path.join(trained, model_files.THRESHOLDS_JSON)).read())

    for k in range(len(LABELS)):
        section = browser.find_element("id", f"label-{k}")
        curves = section.find_elements("css selector", "svg.pr-curve polyline")
        if scored.truth[:, k].any():
            assert len(curves) == 1 and len(curves[0].get_attribute("points").split()) >= 2, LABELS[k]
        else:
            assert not curves and "No example" in section.text

    # Moving one label's threshold shows what the evaluation code computes at that threshold.
    k = 2
    for value in ("0.37", "0.5", str(thresholds[k]), "0.9"):
        section = browser.find_element("id", f"label-{k}")
        control = section.find_element("css selector", "input.thr-number")
        browser.execute_script("arguments[0].value = arguments[1];"
                               "arguments[0].dispatchEvent(new Event('input'))", control, value)
        out = section.find_element("css selector", "output.thr-out")
        expected = evaluate(scored.truth, scored.scores, LABELS, np.full(len(LABELS), float(value), np.float32))
        at = expected["per_label"][QUOTED]["at_tuned"]
        shown = {key: float(out.get_attribute(f"data-{key}")) for key in ("precision", "recall", "f1")}
        assert shown == pytest.approx({key: at[key] for key in shown}, abs=1e-12), value
    range_input = browser.find_element("id", f"label-{k}").find_element("css selector", "input.thr-range")
    browser.execute_script("arguments[0].value = '0.25'; arguments[0].dispatchEvent(new Event('input'))", range_input)
    at = evaluate(scored.truth, scored.scores, LABELS, np.full(len(LABELS), 0.25, np.float32))["per_label"][QUOTED]["at_tuned"]
    out = browser.find_element("id", f"label-{k}").find_element("css selector", "output.thr-out")
    assert float(out.get_attribute("data-recall")) == pytest.approx(at["recall"], abs=1e-12)

    photos = browser.find_elements("css selector", "img.photo")
    maps = browser.find_elements("css selector", "img.cam")
    assert photos and len(maps) == len(photos)
    for image in photos + maps:
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
    assert "class activation maps" not in " ".join(e.text for e in browser.find_elements("css selector", ".note"))

    # The hostile label is text everywhere: no element came from it, no alert ran.
    body = browser.find_element("tag name", "body").text
    assert HOSTILE in body and QUOTED in body and "[object" not in body and "undefined" not in body
    assert browser.execute_script("return document.querySelectorAll('img:not(.photo):not(.cam)').length") == 0
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        _ = browser.switch_to.alert.text
    screenshot(browser, "model-report.png")


def test_page_data_escapes_what_could_end_its_script(trained) -> None:
    html = open(os.path.join(trained, model_files.REPORT_HTML)).read()
    data = html.split('<script type="application/json" id="page-data">')[1].split("</script>")[0]
    assert "<" not in data and ">" not in data and "&" not in data
    assert "\\u003cimg src=x onerror=alert(1)\\u003e" in data


def test_rebuild_without_the_dataset_and_an_old_folder_and_a_missing_thumbnail(trained, tmp_path, browser, capsys) -> None:
    copy = str(tmp_path / "copy")
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("checkpoints", "feature_cache", "backup", "logs"))
    thumbs = os.path.join(copy, model_files.THUMBNAILS_DIR)
    gone = sorted(os.listdir(thumbs))[0]
    os.remove(os.path.join(thumbs, gone))
    assert report.main(["--model_dir", copy]) == 0
    problems, requests = load(browser, os.path.join(copy, model_files.REPORT_HTML))
    assert problems == [] and requests == []
    body = browser.find_element("tag name", "body").text
    assert "1 gallery image(s) are missing" in body and "is not stored with the model" in body

    shutil.rmtree(os.path.join(copy, model_files.EVALUATION_DIR))  # a folder from before the report
    assert report.main(["--model_dir", copy]) == 0
    assert "written before the report existed" in capsys.readouterr().out
    problems, requests = load(browser, os.path.join(copy, model_files.REPORT_HTML))
    assert problems == [] and requests == []
    body = browser.find_element("tag name", "body").text
    assert "written before the report existed" in body and "Learning curves" in body
    assert report.main(["--model_dir", str(tmp_path / "nothing")]) == 2


def test_empty_test_split_and_a_label_without_test_positives_get_sentences(mean_backbone, tmp_path, browser) -> None:
    data_dir = write_dataset(str(tmp_path / "ds"), {"train": 48, "val": 16}, 32, LABELS, seed=6)
    model_dir = str(tmp_path / "model")
    assert task.main(["--data_dir", data_dir, "--model_dir", model_dir, "--hub_handle", mean_backbone,
                      "--epochs", "2", "--batch_size", "16", "--hidden_units", "8"]) == 0
    problems, _ = load(browser, os.path.join(model_dir, model_files.REPORT_HTML))
    assert problems == []
    assert "The test split was empty" in browser.find_element("tag name", "body").text

    scored = report.Scored(np.array(["a", "b", "c"]), np.array([[1, 0], [0, 0], [1, 0]]) > 0,
                           np.array([[0.9, 0.7], [0.2, 0.1], [0.6, 0.3]], np.float32))
    thresholds = np.array([0.5, 0.5], np.float32)
    metrics = evaluate(scored.truth, scored.scores, ["a", "b"], thresholds)
    section = report.evaluation_section(scored, ["a", "b"], thresholds, metrics, {}, {}, "no maps here")
    from tagbeam import pages

    page = str(tmp_path / "section.html")
    with open(page, "w") as f:
        f.write(pages.render(pages.MODEL, "t", {"summary": {"model_dir": "m", "dataset": {"path": "d", "labels": ["a", "b"]}},
                                                "history": {}, "evaluation": section}))
    problems, _ = load(browser, page)
    assert problems == []
    text = browser.find_element("id", "label-1").text
    assert "No example of the 3 in this split has this label" in text and "not stored with the model" in text


def test_class_activation_map_mean_plus_bias_is_the_logit(mean_backbone) -> None:
    backbone = model_lib.load_backbone(mean_backbone)
    head = model_lib.build_head(24, 3, seed=1)
    head.get_layer("logits").set_weights([np.random.default_rng(0).normal(size=(24, 3)).astype("float32"),
                                          np.array([0.3, -0.2, 0.1], "float32")])
    classifier = model_lib.build_classifier(backbone, head, 32)
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    maps, bias = report.class_activation_maps(backbone, head, images)
    assert maps.shape[1:3] == (8, 8) and maps.shape[-1] == 3
    np.testing.assert_allclose(maps.mean(axis=(1, 2)) + bias, classifier(tf.constant(images)).numpy(), atol=1e-4)
    assert report.cam_unavailable(backbone, 0) is None and "hidden layer" in report.cam_unavailable(backbone, 8)


def test_evaluation_reads_the_test_split_in_the_scored_order(trained) -> None:
    info = dataset.read(os.path.join(os.path.dirname(trained), "ds"))
    scored = _scored(trained)
    expected = evaluate(scored.truth, scored.scores, LABELS, np.array(model_files.parse_thresholds_json(
        open(os.path.join(trained, model_files.THRESHOLDS_JSON)).read())[1], np.float32), beta=1.0)
    assert scored.scores.shape == (info.split("test").examples, len(LABELS))
    # The kept scores are the ones metrics.json was computed from.
    assert json.load(open(os.path.join(trained, model_files.METRICS_JSON)))["at_tuned"] == expected["at_tuned"]


def test_night_pages_keep_hostile_labels_as_text_and_say_why_a_night_stopped(tmp_path, browser) -> None:
    from pipelines import night_report
    from tagbeam.workspace import Workspace

    workspace = Workspace(str(tmp_path / "ws"))
    metrics = [{"per_label": {HOSTILE: {"support": 3, "average_precision": 0.5, "at_tuned": {"f1": 0.4}},
                              QUOTED: {"support": 0, "average_precision": None, "at_tuned": {"f1": 0.0}}}},
               {"per_label": {HOSTILE: {"support": 3, "average_precision": 0.7, "at_tuned": {"f1": 0.6}},
                              QUOTED: {"support": 0, "average_precision": None, "at_tuned": {"f1": 0.0}}}}]
    night_report.save_comparison(workspace, "night-1", 12, metrics)
    decision = {"metric": "macro_f1", "reason": "challenger 0.2000 is worse", "challenger": {"value": 0.2},
                "champion": {"value": 0.3}}
    records = [{"run_id": "night-1", "time": "t1", "step": "all", "outcome": "refused", "decision": decision,
                "health": {"passed": True, "failures": [], "numbers": {"examples": 40}}},
               {"run_id": "night-2", "time": "t2", "step": "all", "outcome": "failed", "reason": "data health check failed",
                "health": {"passed": False, "failures": ["rejected share 0.400 vs 0.000"], "numbers": {"examples": 10}}}]
    for record in records:
        workspace.append_history(record)
        night_report.write_logged(workspace, record["run_id"], record)

    problems, requests = load(browser, os.path.join(workspace.run_dir("night-1"), "report.html"))
    assert problems == [] and requests == []
    (row, quiet) = browser.find_elements("css selector", "table.comparison tbody tr")
    assert row.find_elements("tag name", "td")[0].text == HOSTILE and "worse" in row.get_attribute("class")
    assert quiet.get_attribute("class") in (None, "") and "n/a" in quiet.text
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    problems, _ = load(browser, os.path.join(workspace.run_dir("night-2"), "report.html"))
    body = browser.find_element("tag name", "body").text
    assert problems == [] and "The data-health gate refused this night" in body and "rejected share 0.400" in body
    problems, _ = load(browser, os.path.join(workspace.root, "index.html"))
    assert problems == [] and [a.text for a in browser.find_elements("css selector", "tbody a")] == ["night-2", "night-1"]


def test_a_page_that_cannot_be_written_is_logged_not_raised(tmp_path, caplog) -> None:
    # Not a model folder: building fails; at the end of a training run that must only be logged.
    with caplog.at_level("ERROR", logger="trainer.report"):
        assert report.write_logged(str(tmp_path)) is None
    assert "could not write report.html" in caplog.text and "python -m trainer.report --model_dir" in caplog.text


def test_maps_that_cannot_be_computed_cost_the_maps_not_the_scores(trained, tmp_path) -> None:
    info = dataset.read(os.path.join(os.path.dirname(trained), "ds"))
    scored = _scored(trained)
    _, thresholds = model_files.parse_thresholds_json(open(os.path.join(trained, model_files.THRESHOLDS_JSON)).read())

    def mismatched(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise ValueError("spatial features have 24 channels, the head takes 48 features")

    out = str(tmp_path / "model")
    report.save_evaluation(out, info, scored.scores, scored.truth, np.asarray(thresholds, np.float32), None, mismatched)
    np.testing.assert_array_equal(_scored(out).scores, scored.scores)
    assert os.listdir(os.path.join(out, model_files.THUMBNAILS_DIR)) and not os.path.exists(os.path.join(out, model_files.CAMS_DIR))
    context = json.load(open(os.path.join(out, model_files.REPORT_CONTEXT_JSON)))
    assert "computing them failed (ValueError: spatial features have 24 channels" in context["cam_note"]


def test_threshold_control_is_exact_above_the_kept_negatives_and_says_so_below(tmp_path, browser, monkeypatch) -> None:
    from tagbeam import pages

    monkeypatch.setattr(report, "MAX_NEGATIVE_SCORES", 10)  # the cap of a large test split, on a small one
    rng = np.random.default_rng(4)
    truth = rng.random((60, 1)) < 0.3
    scores = np.where(truth, rng.beta(5, 2, truth.shape), rng.beta(2, 5, truth.shape)).astype(np.float32)
    scored = report.Scored(np.array([f"r{i}" for i in range(60)]), truth, scores)
    thresholds = np.array([0.5], np.float32)
    metrics = evaluate(truth, scores, ["only"], thresholds)
    section = report.evaluation_section(scored, ["only"], thresholds, metrics, {}, {}, None)
    floor = section["per_label"][0]["neg_floor"]
    assert floor is not None
    page = str(tmp_path / "capped.html")
    with open(page, "w") as f:
        f.write(pages.render(pages.MODEL, "t", {"summary": {"model_dir": "m", "dataset": {"path": "d", "labels": ["only"]}},
                                                "history": {}, "evaluation": section}))
    assert load(browser, page)[0] == []
    control = browser.find_element("css selector", "#label-0 input.thr-number")
    out = browser.find_element("css selector", "#label-0 output.thr-out")
    for value, exact in ((float(np.nextafter(np.float32(floor), np.float32(1))), True), (floor, False), (0.05, False)):
        browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                               control, repr(value))
        at = evaluate(truth, scores, ["only"], np.array([value], np.float32))["per_label"]["only"]["at_tuned"]
        if exact:
            assert float(out.get_attribute("data-precision")) == pytest.approx(at["precision"], abs=1e-12)
            assert "not exact" not in out.text
        else:
            assert float(out.get_attribute("data-recall")) == pytest.approx(at["recall"], abs=1e-12)  # positives all kept
            assert "not exact" in out.text
