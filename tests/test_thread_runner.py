"""The thread runner the threaded GPU tests rely on: a failure in any thread must fail the caller."""
from __future__ import annotations

import threading
from typing import List

import pytest

from thread_runner import run_in_threads


def test_every_thread_runs_with_its_own_arguments_before_any_is_waited_for() -> None:
    seen: List[int] = []
    lock = threading.Lock()
    # Every thread waits for all the others: this returns only if all were started before the
    # first join (a runner that joined each thread before starting the next would time out here).
    together = threading.Barrier(3, timeout=30)

    def record(value: int) -> None:
        together.wait()
        with lock:
            seen.append(value)

    run_in_threads(record, [(1,), (2,), (3,)])
    assert sorted(seen) == [1, 2, 3]


def test_an_exception_in_a_thread_is_raised_in_the_caller_after_all_threads_end() -> None:
    finished: List[int] = []

    def work(value: int) -> None:
        if value == 2:
            raise ValueError("thread 2 failed")
        finished.append(value)

    with pytest.raises(ValueError, match="thread 2 failed"):
        run_in_threads(work, [(1,), (2,), (3,)])
    assert sorted(finished) == [1, 3]
