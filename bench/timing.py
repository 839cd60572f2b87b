"""How each time is taken (the definitions of docs/performance.md):

- kernel time: the device time of every kernel, copy and fill one call runs, summed from
  torch.profiler over `kernel_calls` calls with the L2 cache flushed (a 256 MB zero_()) before
  each call, the flush's own kernel left out. (`flush_by="read"` flushes by reading the buffer
  instead; see FLUSHES.) All figures of a workload share one profile:
  a one-element int16 fill, a kernel no candidate runs, marks where each figure's calls
  begin and end on the device timeline.
- wall time: triton.testing.do_bench(fn, return_mode="median")'s procedure, written out so that
  it needs no Triton: CUDA events around each call, the flush enqueued before each start event.
  Host overhead that the flush does not hide falls inside the interval.
- host time: a loop of calls and one synchronize at the end, divided by the number of calls.
- graph time: `graph_calls` calls captured in one CUDA graph, its replays timed with events.

On the CPU (functional runs) only wall and host times exist, from the host clock.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch

# One figure's result: microseconds, or the reason it could not be measured.
Measured = Union[float, str]
# A device activity as the profiler reports it: (name, start µs, duration µs).
DeviceEvent = Tuple[str, float, float]

MARKER_VALUE: int = 7
CALIBRATION_REPEATS: int = 3
MIN_WALL_REPEATS: int = 3
MAX_WALL_REPEATS: int = 2000
MIN_HOST_CALLS: int = 10
MAX_HOST_CALLS: int = 2000
GRAPH_WARMUP_CALLS: int = 3


@dataclasses.dataclass(frozen=True)
class Settings:
    kernel_calls: int
    wall_warmup_ms: float
    wall_rep_ms: float
    host_budget_ms: float
    graph_calls: int
    graph_replays: int
    flush_bytes: int
    flush_by: str = "write"  # a key of FLUSHES


# How the L2 is emptied before a timed call. "write" is the project's definition (a zero_() of
# the buffer). It leaves the L2 full of dirty lines, which the timed call then evicts and the
# memory system writes back while the call runs: every new line the call brings in costs a
# write-back. A call that writes in place brings in half the lines of one that writes new outputs
# (its stores hit the lines its loads brought), so it pays half of that. "read" (a max over the
# buffer) leaves clean lines, evicted for free: a figure of the call alone (docs/performance.md).
FLUSHES: Dict[str, Callable[[torch.Tensor], Any]] = {
    "write": lambda buffer: buffer.zero_(),
    "read": lambda buffer: buffer.view(torch.int32).amax(),
}


# do_bench's defaults for the wall time (25 ms warm-up, 100 ms of repeats).
FULL = Settings(kernel_calls=20, wall_warmup_ms=25.0, wall_rep_ms=100.0, host_budget_ms=50.0,
                graph_calls=100, graph_replays=20, flush_bytes=256 << 20)
QUICK = dataclasses.replace(FULL, kernel_calls=8, wall_warmup_ms=5.0, wall_rep_ms=30.0,
                            host_budget_ms=20.0, graph_replays=5)
# Functional runs on a CPU: the numbers mean nothing, the code paths are the ones of a real run.
SMOKE = Settings(kernel_calls=2, wall_warmup_ms=0.5, wall_rep_ms=2.0, host_budget_ms=2.0,
                 graph_calls=4, graph_replays=2, flush_bytes=1 << 20)


class MeasurementError(Exception):
    pass


@dataclasses.dataclass
class Figure:
    key: str                    # "floor", "ours/forward", ...
    fn: Callable[[], Any]


def device_events(prof: Any) -> List[DeviceEvent]:
    """The device activities (kernels, copies, fills) of a finished profile, in
    start order. User annotations also appear on the device timeline: they are not work."""
    cuda = torch._C._autograd.DeviceType.CUDA
    events = []
    for event in prof.events():
        activity = str(getattr(event, "activity_type", "")).lower()
        if event.device_type != cuda or getattr(event, "is_user_annotation", False) \
                or "annotation" in activity or "overhead" in activity:
            continue
        start, end = float(event.time_range.start), float(event.time_range.end)
        events.append((str(event.name), start, end - start))
    return without_spans(events)


def without_spans(events: List[DeviceEvent]) -> List[DeviceEvent]:
    """The events in start order, less those that enclose the next one: on one stream real work
    never overlaps, so an enclosing event is an annotation range, whatever its flags say."""
    ordered = sorted(events, key=lambda e: (e[1], -e[2]))
    kept = []
    for index, (name, start, duration) in enumerate(ordered):
        if index + 1 < len(ordered):
            _, next_start, next_duration = ordered[index + 1]
            # (an annotation around one kernel has that kernel's span: either may go, not both)
            if next_start < start + duration and next_start + next_duration <= start + duration:
                continue
        kept.append((name, start, duration))
    return kept


def split_at_markers(events: List[DeviceEvent], marker_name: str) -> List[List[DeviceEvent]]:
    """The events between consecutive markers (events before the first marker are not part
    of any figure; one stream runs everything, so start order is launch order)."""
    segments: List[List[DeviceEvent]] = []
    current: Optional[List[DeviceEvent]] = None
    for event in events:
        if event[0] == marker_name:
            if current is not None:
                segments.append(current)
            current = []
        elif current is not None:
            current.append(event)
    return segments


def kernel_us_per_call(segment: List[DeviceEvent], flush_names: Set[str], flush_events_per_call: int,
                       calls: int) -> float:
    """Device time per call of one figure's segment, the flushes left out. The count of
    flush-named events must be exact: if a candidate ran a kernel of the same name, its time
    cannot be told apart and the figure is refused rather than guessed."""
    flushes = sum(1 for event in segment if event[0] in flush_names)
    if flushes != calls * flush_events_per_call:
        raise MeasurementError("found {} L2-flush events for {} calls (expected {}): cannot separate "
                               "the flush from the calls".format(flushes, calls, calls * flush_events_per_call))
    return sum(event[2] for event in segment if event[0] not in flush_names) / calls


def _error_text(error: BaseException) -> str:
    text = "{}: {}".format(type(error).__name__, error)
    return text if len(text) < 400 else text[:400] + "..."


class CudaTimer:
    kind = "cuda"

    def __init__(self, device: torch.device, settings: Settings) -> None:
        self.device = device
        self.settings = settings
        self._flush_buffer = torch.empty(settings.flush_bytes, dtype=torch.uint8, device=device)
        self._marker_buffer = torch.empty(1, dtype=torch.int16, device=device)
        self.profiler_error: Optional[str] = None
        self._flush_names: Set[str] = set()
        self._flush_events_per_call = 0
        self._marker_name = ""
        try:
            self._calibrate()
        except Exception as error:  # noqa: BLE001  (no profiler: wall, host and graph times remain)
            self.profiler_error = "profiler unusable: " + _error_text(error)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def flush(self) -> None:
        FLUSHES[self.settings.flush_by](self._flush_buffer)

    def _marker(self) -> None:
        self._marker_buffer.fill_(MARKER_VALUE)

    def _profile(self, body: Callable[[], None]) -> List[DeviceEvent]:
        from torch.profiler import ProfilerActivity, profile

        self.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            body()
            self.synchronize()
        return device_events(prof)

    def _calibrate(self) -> None:
        """Learn the device events a marker and a flush produce, by name."""
        def markers() -> None:
            for _ in range(CALIBRATION_REPEATS):
                self._marker()

        def flushes() -> None:
            for _ in range(CALIBRATION_REPEATS):
                self.flush()

        marker_events = self._profile(markers)
        names = {event[0] for event in marker_events}
        if len(marker_events) != CALIBRATION_REPEATS or len(names) != 1:
            raise MeasurementError("{} marker fills gave device events {}".format(
                CALIBRATION_REPEATS, [event[0] for event in marker_events]))
        flush_events = self._profile(flushes)
        flush_names = {event[0] for event in flush_events}
        if not flush_events or len(flush_events) % CALIBRATION_REPEATS or names & flush_names:
            raise MeasurementError("{} flushes gave device events {}".format(
                CALIBRATION_REPEATS, [event[0] for event in flush_events]))
        self._marker_name = names.pop()
        self._flush_names = flush_names
        self._flush_events_per_call = len(flush_events) // CALIBRATION_REPEATS

    def kernel_times(self, figures: List[Figure]) -> Dict[str, Measured]:
        if self.profiler_error is not None:
            return {figure.key: self.profiler_error for figure in figures}
        calls = self.settings.kernel_calls
        failures: Dict[str, str] = {}

        def run_all() -> None:
            for figure in figures:
                self._marker()
                try:
                    for _ in range(calls):
                        self.flush()
                        figure.fn()
                except Exception as error:  # noqa: BLE001
                    failures[figure.key] = _error_text(error)
            self._marker()

        segments = split_at_markers(self._profile(run_all), self._marker_name)
        if len(segments) != len(figures):
            if len(figures) > 1:  # something in a call disturbed the markers: one profile each
                results: Dict[str, Measured] = {}
                for figure in figures:
                    results.update(self.kernel_times([figure]))
                return results
            return {figures[0].key: "found {} marked segments, expected 1".format(len(segments))}
        results = {}
        for figure, segment in zip(figures, segments):
            if figure.key in failures:
                results[figure.key] = failures[figure.key]
                continue
            try:
                results[figure.key] = kernel_us_per_call(segment, self._flush_names,
                                                         self._flush_events_per_call, calls)
            except MeasurementError as error:
                results[figure.key] = str(error)
        return results

    def wall_us(self, fn: Callable[[], Any]) -> float:
        """Median µs per call, do_bench's way: estimate, warm up, then events around each call."""
        settings = self.settings
        fn()
        self.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            self.flush()
            fn()
        end.record()
        self.synchronize()
        estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
        warmups = max(1, int(settings.wall_warmup_ms / estimate_ms))
        repeats = min(MAX_WALL_REPEATS, max(MIN_WALL_REPEATS, int(settings.wall_rep_ms / estimate_ms)))
        for _ in range(warmups):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            self.flush()
            starts[i].record()
            fn()
            ends[i].record()
        self.synchronize()
        return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

    def host_us(self, fn: Callable[[], Any], estimate_us: float) -> float:
        return _host_us(fn, estimate_us, self.settings, self.synchronize)

    def graph_us(self, fn: Callable[[], Any]) -> Optional[float]:
        """Device µs per call with `graph_calls` calls captured in one CUDA graph."""
        settings = self.settings
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm up off the default stream, as graph capture asks
            for _ in range(GRAPH_WARMUP_CALLS):
                fn()
        current.wait_stream(side)
        self.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(settings.graph_calls):
                fn()
        graph.replay()
        self.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(settings.graph_replays):
            graph.replay()
        end.record()
        self.synchronize()
        elapsed_ms = start.elapsed_time(end)
        del graph
        return 1000.0 * elapsed_ms / (settings.graph_replays * settings.graph_calls)


def _host_us(fn: Callable[[], Any], estimate_us: float, settings: Settings,
             synchronize: Callable[[], None]) -> float:
    """µs per call of a loop of calls with one synchronize at the end (what decoding feels)."""
    calls = int(settings.host_budget_ms * 1000.0 / max(estimate_us, 1.0))
    calls = min(MAX_HOST_CALLS, max(MIN_HOST_CALLS, calls))
    fn()
    fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize()
    return 1e6 * (time.perf_counter() - start) / calls


class CpuTimer:
    """Functional stand-in on the CPU: same procedure, host clock, no kernel or graph times."""

    kind = "cpu"
    profiler_error: Optional[str] = None

    def __init__(self, device: torch.device, settings: Settings) -> None:
        self.device = device
        self.settings = settings
        self._flush_buffer = torch.empty(settings.flush_bytes, dtype=torch.uint8)

    def synchronize(self) -> None:
        pass

    def flush(self) -> None:
        FLUSHES[self.settings.flush_by](self._flush_buffer)

    def kernel_times(self, figures: List[Figure]) -> Dict[str, Measured]:
        return {}

    def wall_us(self, fn: Callable[[], Any]) -> float:
        settings = self.settings
        fn()
        start = time.perf_counter()
        fn()
        estimate_ms = max((time.perf_counter() - start) * 1000.0, 1e-3)
        for _ in range(max(1, int(settings.wall_warmup_ms / estimate_ms))):
            fn()
        times = []
        for _ in range(min(MAX_WALL_REPEATS, max(MIN_WALL_REPEATS, int(settings.wall_rep_ms / estimate_ms)))):
            self.flush()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e6 * statistics.median(times)

    def host_us(self, fn: Callable[[], Any], estimate_us: float) -> float:
        return _host_us(fn, estimate_us, self.settings, self.synchronize)

    def graph_us(self, fn: Callable[[], Any]) -> Optional[float]:
        return None


Timer = Union[CudaTimer, CpuTimer]


def make_timer(device: torch.device, settings: Settings) -> Timer:
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return CudaTimer(device, settings)
    return CpuTimer(device, settings)
