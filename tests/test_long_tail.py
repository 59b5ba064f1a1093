import random

from recipes.long_tail import MEDIAN_FRACTION, draw_length


def test_lengths_stay_within_the_cap_and_have_a_heavy_tail():
    rng = random.Random(0)
    cap = 256
    lengths = sorted(draw_length(rng, cap) for _ in range(4000))
    assert lengths[0] >= 1 and lengths[-1] == cap
    median = lengths[len(lengths) // 2]
    assert abs(median - cap * MEDIAN_FRACTION) <= 0.15 * cap * MEDIAN_FRACTION
    # The tail: the longest 5% are several times the median.
    assert lengths[int(0.95 * len(lengths))] >= 4 * median
