"""pipelines.health: the data-health gate's checks on dataset.json records."""
from __future__ import annotations

from pipelines.health import HealthOptions, check
from tagbeam.dataset import DatasetInfo, SplitInfo


def info(examples: dict[str, int], rejected: int) -> DatasetInfo:
    labels = tuple(examples)
    total = max(examples.values())
    return DatasetInfo(labels=labels, image_size=32, image_format="jpeg", resize_policy="squash",
                       splits={"train": SplitInfo(examples=total, label_counts=examples)},
                       input_rows=total + rejected, rejected=rejected,
                       rejected_by_reason={"fetch:http_404": rejected} if rejected else {})


def test_a_dataset_like_the_champions_passes():
    champion = info({"cat": 100, "dog": 80, "rare": 5}, rejected=2)
    report = check(info({"cat": 104, "dog": 75, "rare": 1}, rejected=3), champion, HealthOptions())
    assert report["passed"], report
    assert check(champion, None, HealthOptions())["note"] == "no champion to compare with"


def test_each_check_fails_with_its_numbers_and_a_bound_of_one_turns_it_off():
    champion = info({"cat": 100, "dog": 80, "bird": 40}, rejected=0)
    night = info({"cat": 60, "dog": 30, "bird": 0}, rejected=40)
    report = check(night, champion, HealthOptions())
    assert not report["passed"]
    text = "\n".join(report["failures"])
    assert "rejected share 0.400 vs 0.000" in text and "fetch:http_404 40" in text
    assert "examples 60 vs 100" in text and "a drop of 0.400 > --max_examples_drop 0.2" in text
    assert "vanished: bird (40 -> 0)" in text and "dog (80 -> 30)" in text
    lenient = HealthOptions(max_rejected_rise=1, max_examples_drop=1, max_label_drop=1)
    assert check(night, champion, lenient)["passed"]
