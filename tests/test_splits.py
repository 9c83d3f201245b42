"""The split is a pure function of the id: fractions hold and no id ever moves."""
from __future__ import annotations

from collections import Counter

import pytest

from pipelines.options import SplitOptions
from pipelines.splits import split_of


def test_split_fractions_and_stability():
    ids = [f"tt{i:07d}" for i in range(20000)]
    first = [split_of(i, 0.1, 0.2) for i in ids]
    counts = Counter(first)
    assert abs(counts["val"] / len(ids) - 0.1) < 0.01
    assert abs(counts["test"] / len(ids) - 0.2) < 0.01
    assert first == [split_of(i, 0.1, 0.2) for i in ids]
    # Membership depends on the id alone, not on which other ids are present.
    assert [split_of(i, 0.1, 0.2) for i in reversed(ids[:500])] == list(reversed(first[:500]))


def test_fractions_are_checked():
    SplitOptions(val_fraction=0.0, test_fraction=1.0)
    with pytest.raises(ValueError, match="--val_fraction 0.6 and --test_fraction 0.5"):
        SplitOptions(val_fraction=0.6, test_fraction=0.5)
