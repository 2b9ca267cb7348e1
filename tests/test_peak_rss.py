"""A run's peak RSS is its own, even after a bigger run in the same process (sweeps)."""

import numpy as np
import pytest

from ftlib import peak_rss


def test_reset_starts_a_new_peak():
    if not peak_rss.reset():
        pytest.skip("this platform cannot reset the peak RSS")
    before = peak_rss.peak_mb()
    big = np.ones(300 * 2**20 // 8)  # 300 MB, every page touched
    during = peak_rss.peak_mb()
    assert during > before + 250
    del big  # numpy unmaps a large array: resident memory drops again
    assert peak_rss.reset()
    assert peak_rss.peak_mb() < during - 250
