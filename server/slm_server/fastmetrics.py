"""Lock-free Counter, Gauge and Histogram for the request path, exposed through prometheus_client,
and the queue that applies the request path's observations to them in batches.

Why not prometheus_client's own classes: each of their updates takes a lock and a histogram walks
its buckets linearly, about 1.5-2 µs per observation; a generation request makes ~15 of them (and
one per generated token for inter-token latency), which alone would exceed the server's budget of
25 µs of monitoring per request. These do a `bisect` and two additions.

Why a queue (`Observations`): even so, the metrics cost about 15 µs per request with each update
made at once, between the request's other work, and about 10 µs with the updates queued and made
back to back for a few hundred requests (the batch itself under 4 µs per request; measured side by
side with bench/bench_server.py's workers on the project's 2-core VM: made in a row, the updates'
code and data stay in the CPU's caches). So the
request path only appends `(apply, args)` to a deque, and the observations are applied when
`batch_size` of them are waiting at the end of a request (after its response has gone), and always
before a family is collected: a scrape, or any `registry.get_sample_value`, sees every observation
made before it. Nothing is ever stale to a reader.

The contract that makes the lock-free children safe: children are updated only by
`Observations.apply`, which holds a lock (whichever thread calls it: the event loop when the
queue fills or /metrics is served by the app, a test's thread through the registry), or, for the
rare updates that are not queued (errors, gauges), on the event loop thread, each on children the
queue never touches. Each family is a prometheus_client `Collector` registered on the app's
`CollectorRegistry`, so exposition, `promtool check metrics` and `registry.get_sample_value` see
ordinary families. Same constructor and `labels()` surface as prometheus_client's classes, for the
subset the server uses.
"""

from __future__ import annotations

import logging
import math
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger("slm_server.metrics")


class Observations:
    """Metric updates queued on the request path, applied in batches (see the module's doc)."""

    def __init__(self, batch_size: int = 512):
        self.batch_size = batch_size
        self._queue: deque[tuple[Callable[..., None], tuple]] = deque()
        self._lock = threading.Lock()

    def add(self, apply: Callable[..., None], *args: object) -> None:
        """Queue `apply(*args)`. What `args` refers to must not change afterwards."""
        self._queue.append((apply, args))

    def add_final(self, apply: Callable[..., None], *args: object) -> None:
        """Queue a request's last update (its response has gone), then apply the queue if it holds
        `batch_size` updates or more: the batch's cost never delays a response, and the queue's
        memory stays bounded without scrapes."""
        queue = self._queue
        queue.append((apply, args))
        if len(queue) >= self.batch_size:
            self.apply()

    def apply(self) -> None:
        """Apply every update queued so far."""
        with self._lock:
            queue = self._queue
            for _ in range(len(queue)):  # appends from other threads meanwhile wait for the next call
                apply, args = queue.popleft()
                try:
                    apply(*args)
                except Exception:  # one bad observation must not lose the others, nor fail a request
                    log.exception("metric update failed", extra={"fields": {"event": "error"}})

    def __len__(self) -> int:
        return len(self._queue)


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class GaugeChild:
    __slots__ = ("function", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.function: Callable[[], float] | None = None

    def set_function(self, function: Callable[[], float]) -> None:
        """Read the value from `function` at collection time (a state the server keeps anyway)."""
        self.function = function

    def read(self) -> float:
        return float(self.function()) if self.function is not None else self.value

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class HistogramChild:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self._bounds = bounds  # finite upper bounds, sorted
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. the bucket `le` that holds it.
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value

    def observe_gaps(self, times: Sequence[float]) -> None:
        """Observe each difference between consecutive `times` (inter-token latencies), in one loop
        with no generator: a generation of n tokens makes n - 1 observations."""
        bounds, counts = self._bounds, self.counts
        previous = times[0]
        for now in times[1:]:
            counts[bisect_left(bounds, now - previous)] += 1
            previous = now
        self.sum += times[-1] - times[0]  # the gaps add up to the span


class _Family(Collector):
    type_ = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
        observations: Observations | None = None,
    ):
        self.name = name
        self._observations = observations  # applied before each collection
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, **labels: object):
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        key = tuple(str(labels[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def _new_child(self) -> object:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        yield self._family()  # names only, for the registry's duplicate check

    def collect(self) -> Iterator[Metric]:
        if self._observations is not None:
            self._observations.apply()
        family = self._family()
        for key, child in list(self._children.items()):
            self._add(family, list(key), child)
        yield family

    def _add(self, family, key: list[str], child) -> None:
        family.add_metric(key, child.value)


class Counter(_Family):
    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _family(self) -> Metric:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class Gauge(_Family):
    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def _family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family, key: list[str], child) -> None:
        family.add_metric(key, child.read())


class Histogram(_Family):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
        buckets: Sequence[float] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        observations: Observations | None = None,
    ):
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be sorted and distinct")
        self._bounds = bounds
        self._le = [floatToGoString(b) for b in bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry, observations)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._bounds)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family, key: list[str], child) -> None:
        cumulative, buckets = 0, []
        for le, count in zip(self._le, child.counts, strict=True):
            cumulative += count
            buckets.append((le, cumulative))
        family.add_metric(key, buckets, child.sum)
