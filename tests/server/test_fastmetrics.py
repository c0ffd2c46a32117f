"""The request path's metric families and the queue that applies their observations in batches
(slm_server.fastmetrics): what a scrape sees, what memory the queue may hold, what a bad update
costs. Pure unit tests: a fresh registry, no server."""

from __future__ import annotations

import logging
import sys
import threading

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from slm_server.fastmetrics import Counter, Histogram, Observations


def _families(batch_size: int) -> tuple[CollectorRegistry, Observations, Counter, Histogram]:
    registry, observations = CollectorRegistry(), Observations(batch_size=batch_size)
    counter = Counter("t_requests_total", "requests", ["endpoint"], registry=registry, observations=observations)
    histogram = Histogram(
        "t_latency_seconds", "latency", ["endpoint"], registry=registry, buckets=(0.1, 1), observations=observations
    )
    return registry, observations, counter, histogram


def test_every_queued_observation_is_in_the_next_scrape():
    registry, observations, counter, histogram = _families(batch_size=1000)
    requests, latency = counter.labels(endpoint="/a"), histogram.labels(endpoint="/a")
    for i in range(10):
        observations.add(requests.inc)
        observations.add(latency.observe, 0.05 if i < 7 else 0.5)
    assert len(observations) == 20  # below the batch size: nothing applied yet, all of it queued
    assert registry.get_sample_value("t_requests_total", {"endpoint": "/a"}) == 10
    assert registry.get_sample_value("t_latency_seconds_bucket", {"endpoint": "/a", "le": "0.1"}) == 7
    assert registry.get_sample_value("t_latency_seconds_count", {"endpoint": "/a"}) == 10
    observations.add(requests.inc, 5)
    assert b't_requests_total{endpoint="/a"} 15.0' in generate_latest(registry)


def test_the_queue_never_holds_more_than_a_batch_without_a_scrape():
    """Each request queues some updates and one final one (the middleware's, after the response)."""
    registry, observations, counter, histogram = _families(batch_size=64)
    requests, latency = counter.labels(endpoint="/a"), histogram.labels(endpoint="/a")
    longest = 0
    for _ in range(10_000):
        observations.add(latency.observe, 0.5)
        observations.add(requests.inc)
        longest = max(longest, len(observations))
        observations.add_final(requests.inc)
        longest = max(longest, len(observations))
    assert longest < 64 + 3
    assert registry.get_sample_value("t_requests_total", {"endpoint": "/a"}) == 20_000
    assert registry.get_sample_value("t_latency_seconds_count", {"endpoint": "/a"}) == 10_000


def test_a_failing_update_is_logged_and_loses_no_other(caplog):
    registry, observations, counter, _ = _families(batch_size=1000)
    requests = counter.labels(endpoint="/a")
    observations.add(requests.inc)
    observations.add(requests.inc, -1)  # a counter refuses to go down
    observations.add(requests.inc)
    with caplog.at_level(logging.ERROR, logger="slm_server.metrics"):
        assert registry.get_sample_value("t_requests_total", {"endpoint": "/a"}) == 2
    assert [r.getMessage() for r in caplog.records] == ["metric update failed"]
    assert "counters only go up" in caplog.text


def test_scrapes_on_another_thread_lose_no_update():
    """A scraper thread collects without pause while this thread queues 30,000 updates with a small
    batch, so the two apply batches at the same time all along; the interpreter switches threads
    every microsecond, so an unguarded `value += 1` would lose updates."""
    registry, observations, counter, histogram = _families(batch_size=8)
    requests, latency = counter.labels(endpoint="/a"), histogram.labels(endpoint="/a")
    done = threading.Event()
    scrapes = 0

    def scrape() -> None:
        nonlocal scrapes
        while not done.is_set():
            generate_latest(registry)
            scrapes += 1

    scraper = threading.Thread(target=scrape)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    scraper.start()
    try:
        for i in range(15_000):
            observations.add(requests.inc)
            observations.add_final(latency.observe, i % 2)
    finally:
        done.set()
        scraper.join(timeout=10)
        sys.setswitchinterval(switch_interval)
    assert scrapes > 0
    assert registry.get_sample_value("t_requests_total", {"endpoint": "/a"}) == 15_000
    assert registry.get_sample_value("t_latency_seconds_count", {"endpoint": "/a"}) == 15_000
    assert registry.get_sample_value("t_latency_seconds_sum", {"endpoint": "/a"}) == 7_500


def test_inter_token_gaps_land_in_their_buckets():
    registry, _, _, histogram = _families(batch_size=1000)
    itl = histogram.labels(endpoint="/a")
    itl.observe_gaps([10.0, 10.05, 10.55, 12.55])  # gaps 0.05, 0.5, 2.0
    itl.observe_gaps([3.0])  # one token: no gap
    value = registry.get_sample_value
    assert value("t_latency_seconds_bucket", {"endpoint": "/a", "le": "0.1"}) == 1
    assert value("t_latency_seconds_bucket", {"endpoint": "/a", "le": "1.0"}) == 2
    assert value("t_latency_seconds_count", {"endpoint": "/a"}) == 3
    assert abs(value("t_latency_seconds_sum", {"endpoint": "/a"}) - 2.55) < 1e-9
