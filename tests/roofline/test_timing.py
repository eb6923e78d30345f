import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roofline import Cost, Timing, copy_inputs, time_fn, timing
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


def test_rotation_copies_exceed_the_cache_within_the_limits():
    assert timing.rotation_copies(32 << 20) == 4  # 4 x 32 MB > 128 MB
    assert timing.rotation_copies(1 << 30) == 2  # never fewer than min_copies
    assert timing.rotation_copies(1 << 10) == 8  # never more than max_copies
    assert timing.rotation_copies(30 << 30, max_bytes=40 << 30) == 1  # what fits
    assert timing.rotation_copies(1 << 20, exceed_bytes=0, min_copies=1) == 1
    assert timing.tree_nbytes((jnp.zeros((4, 8)), {"a": np.zeros(3, np.int8)}, 5, None)) == 4 * 8 * 4 + 3


def test_in_program_loop_times_calls_inside_one_program_over_rotated_copies():
    x = jnp.ones((256, 256))
    sets = copy_inputs((x,), 3)
    runner = timing.in_program_loop(lambda a: a @ a, sets, target_s=0.005, max_calls=30)
    assert runner.copies == 3 and runner.calls % 3 == 0 and 3 <= runner.calls <= 30
    (t,) = timing.interleave({"mm": runner}, rounds=2).values()
    assert t.device.repeats == t.dispatch.repeats == 2
    assert t.device.min_s > 0 and t.dispatch.min_s > 0 and (t.calls, t.copies) == (runner.calls, 3)


def test_the_loop_cannot_drop_or_hoist_the_call():
    sets = copy_inputs((jnp.arange(4.0),), 2)
    runner = timing.in_program_loop(lambda a: a * 2.0, sets, target_s=0.0, max_calls=2)
    text = runner.jloop.lower(runner.sets).as_text()
    assert "while" in text and "optimization_barrier" in text
    assert runner.calls == 2


class _Fake:
    def __init__(self, seconds, calls=2, fail_at=None):
        self.seconds, self.calls, self.copies, self.fail_at, self.runs = seconds, calls, 1, fail_at, []

    def device_s(self):
        self.runs.append("device")
        if self.fail_at is not None and len(self.runs) > self.fail_at:
            raise RuntimeError("broke")
        return self.seconds

    def dispatch_s(self):
        self.runs.append("dispatch")
        return 2 * self.seconds


def test_interleave_runs_rounds_across_runners_and_isolates_a_broken_one():
    order = []
    a, b = _Fake(1.0), _Fake(3.0)
    for name, r in (("a", a), ("b", b)):
        r.device_s = lambda r=r, name=name, f=r.device_s: order.append(name) or f()
    res = timing.interleave({"a": a, "b": b}, rounds=3, dispatch=False)
    assert order == ["a", "b"] * 3  # interleaved, not all of a then all of b
    assert res["a"].device.median_s == 0.5 and res["b"].device.median_s == 1.5 and res["a"].dispatch is None
    broken = _Fake(1.0, fail_at=1)
    errors = {}
    res = timing.interleave({"ok": _Fake(1.0), "bad": broken}, rounds=3, errors=errors)
    assert set(res) == {"ok"} and isinstance(errors["bad"], RuntimeError)
    assert res["ok"].dispatch.median_s == 1.0 and res["ok"].device.repeats == 3
    with pytest.raises(RuntimeError, match="broke"):
        timing.interleave({"bad": _Fake(1.0, fail_at=0)}, rounds=1)
    with pytest.raises(ValueError, match="rounds=0"):
        timing.interleave({}, rounds=0)


def test_interleaved_ratio_of_a_function_against_itself_is_about_one():
    def f():
        time.sleep(0.002)

    assert 0.5 < timing.interleaved_ratio(f, (), f, (), rounds=3) < 2.0
    with pytest.raises(ValueError, match="rounds=0"):
        timing.interleaved_ratio(f, (), f, (), rounds=0)
