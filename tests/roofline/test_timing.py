import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roofline import Cost, Timing, copy_inputs, time_fn
from roofline.hardware import Chip


def test_times_a_known_sleep():
    t = time_fn(lambda: time.sleep(0.01), min_repeats=3, min_time_s=0.0, warmup=1)
    assert t.repeats == 3
    assert 0.009 < t.median_s < 0.1


def test_waits_for_asynchronous_results():
    x = jnp.ones((512, 512))
    f = jax.jit(lambda a: jnp.linalg.matrix_power(a / 512, 20))
    t = time_fn(f, x, min_repeats=3, min_time_s=0.0)
    assert t.min_s > 0 and np.isfinite(t.median_s)


def test_rotates_through_copies():
    seen = []

    def f(a):
        seen.append(a.unsafe_buffer_pointer())
        return a

    x = jnp.arange(8.0)
    time_fn(f, x, copies=3, min_repeats=6, min_time_s=0.0, warmup=0)
    assert len(set(seen)) == 3
    sets = copy_inputs((x, 3, np.ones(2)), 2)
    assert sets[1][1] == 3 and sets[1][0] is not x and np.array_equal(sets[1][0], x)


def test_repeats_until_min_time():
    t = time_fn(lambda: None, min_repeats=2, min_time_s=0.05)
    assert t.repeats > 2


def test_statistics_and_achieved_fraction():
    t = Timing((1.0, 2.0, 3.0, 4.0, 100.0))
    assert t.median_s == 3.0 and t.min_s == 1.0 and t.iqr_s == 2.0
    chip = Chip("c", "", {"fp32": 10.0}, bandwidth=5.0, memory=1.0, price_per_hour=None, sources={})
    a = t.achieved(Cost(flops=6.0, bytes_read=3.0, bytes_written=0.0), chip, "fp32")
    # bound = max(6/10, 3/5) = 0.6 s against a 3 s median.
    assert a.bound_s == pytest.approx(0.6) and a.fraction == pytest.approx(0.2)
    assert a.flops_per_s == pytest.approx(2.0) and a.bytes_per_s == pytest.approx(1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="copies=0"):
        time_fn(lambda: None, copies=0)
    with pytest.raises(ValueError, match="min_repeats"):
        time_fn(lambda: None, min_repeats=0)
    with pytest.raises(ValueError, match="either"):
        time_fn(lambda a: a, 1, input_sets=[(1,)])
