"""Prometheus metrics shared by the daemons: a registry per process and a small HTTP server for it.

Every role builds its own `CollectorRegistry` rather than using prometheus-client's global one: tests run
several orchestrators (or miners) in one process, and the global registry refuses a second metric of the
same name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("iota.metrics")

# Work items and replays on the tiny preset take tenths of a second on a CPU; a large stage on a GPU takes
# seconds; a stuck one runs into its deadline (minutes).
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, math.inf)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve `registry` at http://host:port/metrics from a daemon thread; returns the bound port (port 0
    picks a free one)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


def serve_daemon_metrics(registry: CollectorRegistry, host: str, port: int) -> int | None:
    """A daemon's metrics server, if its settings ask for one (port 0: none). A port that cannot be bound is
    logged loudly and otherwise ignored: the daemon's work matters more than its metrics."""
    if not port:
        return None
    try:
        return serve_metrics(registry, host, port)
    except OSError as error:
        log.error("cannot serve metrics on %s:%d: %s", host, port, error)
        return None


class StateCollector(Collector):
    """Metrics read from a daemon's own state at scrape time, so they can never drift from it.

    `families` is called on every scrape and returns the metric families to expose.
    """

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families()

    def describe(self) -> Iterable[Metric]:
        # Nothing up front: the registry must not call `families` at registration, before the state exists.
        return []


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    """A one-sample counter family (`name` without `_total`; the exposition adds it)."""
    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled(
    cls: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    doc: str,
    labels: list[str],
    samples: Iterable[tuple[list[str], float]],
) -> Metric:
    family = cls(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def labelled_gauge(
    name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float]]
) -> Metric:
    return _labelled(GaugeMetricFamily, name, doc, labels, samples)


def labelled_counter(
    name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float]]
) -> Metric:
    return _labelled(CounterMetricFamily, name, doc, labels, samples)


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB': for status lines."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
