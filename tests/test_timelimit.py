"""The per-element wall-clock limit (pipeline/timelimit.py): a child process that is killed when a call overruns."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.timelimit import ChildDied, TimeLimitedFunction, TimeLimitedPool, TimeLimitExceeded


@pytest.fixture
def make():
    created = []

    def factory(target, timeout_s=30.0):
        created.append(TimeLimitedFunction(target, timeout_s))
        return created[-1]

    yield factory
    for function in created:
        function.close()


def test_results_and_exceptions_come_back(make):
    sqrt = make("math:sqrt")
    assert sqrt(16.0) == 4.0
    with pytest.raises(ValueError, match="math domain error"):
        sqrt(-1.0)
    assert sqrt(9.0) == 3.0  # the same child serves call after call, even after an exception


def test_an_overrunning_call_is_killed_and_the_next_call_gets_a_fresh_child(make):
    sleep = make("time:sleep", timeout_s=0.5)
    # CPU-bound or blocked, the child is killed either way; time.sleep stands in for a pathological decode.
    with pytest.raises(TimeLimitExceeded, match="longer than 0.5 s"):
        sleep(60)
    assert sleep(0) is None


def test_a_child_that_dies_is_reported_and_replaced(make):
    evaluate = make("builtins:eval")
    # The way a segfault or the OOM killer ends a decode: the process is gone without a reply.
    with pytest.raises(ChildDied, match="exited with code 3"):
        evaluate("__import__('os')._exit(3)")
    assert evaluate("2 + 3") == 5


def test_the_limit_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        TimeLimitedFunction("math:sqrt", 0)


def test_a_pool_serves_calls_from_several_threads_on_as_many_children():
    pool = TimeLimitedPool("builtins:eval", 30.0, size=2)
    try:
        with ThreadPoolExecutor(2) as threads:
            pids = list(threads.map(pool, ["__import__('time').sleep(1) or __import__('os').getpid()"] * 2))
        assert len(set(pids)) == 2  # both calls ran at once, each in a child of its own
        assert pool("__import__('os').getpid()") in pids  # and the children stay for later calls
    finally:
        pool.close()
