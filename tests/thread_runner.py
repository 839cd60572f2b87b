"""Running test code in threads of its own, so that what fails in a thread fails the test.

An exception raised in a `threading.Thread` only prints a traceback and ends that thread; the
thread that started it carries on as if nothing happened. The threaded tests (first calls from a
new thread, concurrent callers) use this instead, usually inside a fresh process.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, List, Sequence, Tuple


def run_in_threads(target: Callable[..., Any], args_per_thread: Sequence[Tuple[Any, ...]]) -> None:
    """Run `target(*args)` in one new thread per entry of `args_per_thread`, all started before any
    is waited for; when every thread has ended, raise the first exception any of them raised."""
    errors: List[BaseException] = []

    def guarded(*args: Any) -> None:
        try:
            target(*args)
        except BaseException as error:  # noqa: BLE001  (re-raised in the calling thread)
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=args) for args in args_per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
