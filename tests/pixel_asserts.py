"""Comparing 8-bit images drawn by two paths that compute the same thing in a different batch layout."""

import numpy as np

# One prompt per call against a batch of prompts, or a guider's separate conditional and unconditional
# calls against classifier-free guidance's concatenated batch, run the same arithmetic through other
# kernel blockings; on some CPUs that moves a float by an ulp and flips the rounding of a rare pixel.
MOST_DIFFERING_SHARE = 0.005


def assert_same_pixels(actual, expected) -> None:
    """Equal to within one level, on at most half a percent of the values."""
    actual, expected = np.asarray(actual, dtype=int), np.asarray(expected, dtype=int)
    assert actual.shape == expected.shape
    difference = np.abs(actual - expected)
    assert difference.max() <= 1, f"pixels differ by up to {difference.max()} levels"
    assert (difference > 0).mean() <= MOST_DIFFERING_SHARE, f"{(difference > 0).mean():.2%} of the values differ"
