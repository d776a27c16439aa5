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


def test_map_answers_every_call_in_order_with_results_or_exceptions(make):
    sqrt = make("math:sqrt")
    first, error, last = sqrt.map([(16.0,), (-1.0,), (9.0,)])
    assert (first, last) == (4.0, 3.0)
    assert isinstance(error, ValueError) and "math domain error" in str(error)
    assert sqrt.map([]) == []


def test_map_limits_each_call_and_goes_on_in_a_fresh_child(make):
    evaluate = make("builtins:eval", timeout_s=1.0)
    pid = "__import__('os').getpid()"
    # Each of the quick calls takes a fraction of the limit, together more than it: the limit is per call.
    quick = "__import__('time').sleep(0.4) or " + pid
    outcomes = evaluate.map([(quick,), (quick,), (quick,), ("__import__('time').sleep(60)",), (pid,)])
    assert len(set(outcomes[:3])) == 1, "the calls before the overrun share one child"
    assert isinstance(outcomes[3], TimeLimitExceeded)
    assert isinstance(outcomes[4], int) and outcomes[4] != outcomes[0], "the calls after it run in a new child"


def test_map_reports_a_child_that_died_and_goes_on(make):
    evaluate = make("builtins:eval")
    outcomes = evaluate.map([("1 + 1",), ("__import__('os')._exit(3)",), ("2 + 3",)])
    assert outcomes[0] == 2 and outcomes[2] == 5
    assert isinstance(outcomes[1], ChildDied) and "exited with code 3" in str(outcomes[1])


def test_a_pool_maps_on_one_free_child():
    pool = TimeLimitedPool("builtins:eval", 30.0, size=2)
    try:
        pids = pool.map([("__import__('os').getpid()",)] * 3)
        assert len(set(pids)) == 1
    finally:
        pool.close()


def test_map_without_a_child_that_starts_fails_every_call_with_the_reason(make):
    missing = make("no_such_module_here:f")
    outcomes = missing.map([(1,), (2,)])
    assert len(outcomes) == 2 and all(isinstance(o, ChildDied) and "while starting" in str(o) for o in outcomes)
    with pytest.raises(ChildDied, match="while starting"):
        missing(1)
