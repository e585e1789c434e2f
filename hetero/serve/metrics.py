"""The server's Prometheus metrics, served as text at /metrics on the HTTP port.

`Metrics` is also the batcher's observer (hetero.serve.batcher.Observer): the batcher tells it of every batch a
device ran, every request answered or failed, and every device that left the pool, from its own threads
(prometheus-client's metrics are thread-safe). The protocols tell it of every request they received and how it
ended. Its registry is its own, not prometheus-client's global one, so that servers in one process (tests) do
not mix their counts."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds from half a millisecond (a small batch on a GPU) to ten (a queue backed up far past any deadline).
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Samples per batch: the sizes profiles measure, in powers of two
BATCH_BUCKETS = tuple(2.0**k for k in range(13))


class Metrics:
    """Counts, times and batch sizes of one server."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, devices: Sequence[str]):
        self.registry = CollectorRegistry()
        self.requests = Counter("hetero_requests", "Inference requests received, by protocol and outcome "
                                "(ok, bad_request, unknown_model, rejected, expired, unavailable, cancelled, error)",
                                ["protocol", "outcome"], registry=self.registry)
        self.in_flight = Gauge("hetero_requests_in_flight", "Inference requests received and not yet answered",
                               registry=self.registry)
        self.failures = Counter("hetero_failures", "Requests the batcher did not answer with outputs, by reason",
                                ["reason"], registry=self.registry)
        self.answers = Counter("hetero_answered", "Requests answered with outputs", registry=self.registry)
        self.goodput = Counter("hetero_goodput", "Requests answered with outputs within their deadline",
                               registry=self.registry)
        self.queue_seconds = Histogram("hetero_queue_seconds", "Seconds an answered request waited before its "
                                       "batch started", buckets=SECONDS_BUCKETS, registry=self.registry)
        self.compute_seconds = Histogram("hetero_compute_seconds", "Seconds the batches of an answered request "
                                         "computed", buckets=SECONDS_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("hetero_batch_size", "Samples per batch a device ran", ["device"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.busy_seconds = Counter("hetero_device_busy_seconds", "Seconds a device spent computing batches",
                                    ["device"], registry=self.registry)
        self.device_out_gauge = Gauge("hetero_device_out", "1 for a device out of the pool, after a failure",
                                      ["device"], registry=self.registry)
        for device in devices:  # every device shows from the start, not only once it fails
            self.device_out_gauge.labels(device).set(0)

    def request(self, protocol: str, outcome: str) -> None:
        self.requests.labels(protocol, outcome).inc()

    # hetero.serve.batcher.Observer

    def batch(self, device: str, size: int, compute_s: float) -> None:
        self.batch_size.labels(device).observe(size)
        self.busy_seconds.labels(device).inc(compute_s)

    def answered(self, queue_s: float, compute_s: float, within_deadline: bool) -> None:
        self.queue_seconds.observe(queue_s)
        self.compute_seconds.observe(compute_s)
        self.answers.inc()
        if within_deadline:
            self.goodput.inc()

    def failed(self, reason: str) -> None:
        self.failures.labels(reason).inc()

    def device_out(self, device: str, error: str) -> None:
        self.device_out_gauge.labels(device).set(1)

    def text(self) -> bytes:
        """Every metric in Prometheus's text format."""
        return generate_latest(self.registry)
