"""Prometheus metrics of the serving ingress, exposed at ``GET /metrics`` in the text format.

They live in their own module on purpose: Ray Serve pickles the ingress methods by value, which
would copy module-level metric objects into each function. Code reaches them as
``metrics.REQUESTS`` etc. through this module, which is always imported by reference, so every
request handler and the middleware update the one registry of the replica process.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry()

REQUESTS = Counter("modelcommons_http_requests", "HTTP requests answered.", ["endpoint", "method", "status"],
                   registry=REGISTRY)
ERRORS = Counter("modelcommons_http_errors", "HTTP requests answered with a 4xx or 5xx status.",
                 ["endpoint", "status"], registry=REGISTRY)
LATENCY = Histogram("modelcommons_detect_latency_seconds",
                    "Latency of successful POST /v1/detect, from request to answer, seconds.",
                    ["model", "version"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
DETECTIONS = Counter("modelcommons_detections", "Objects returned by POST /v1/detect.", ["model", "version"],
                     registry=REGISTRY)
# A histogram of its own: adding a label to LATENCY would change every existing series and its queries.
PRECISION_LATENCY = Histogram("modelcommons_detect_precision_latency_seconds",
                              "Latency of successful POST /v1/detect by the precision that ran (float, int8), "
                              "seconds.", ["model", "precision"], registry=REGISTRY,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))


def count_request(endpoint: str, method: str, status: int) -> None:
    """Count one answered request (and one error when ``status`` >= 400)."""
    REQUESTS.labels(endpoint, method, str(status)).inc()
    if status >= 400:
        ERRORS.labels(endpoint, str(status)).inc()


def observe_detect(model: str, version: str | None, seconds: float, detections: int,
                   precision: str = "float") -> None:
    """Record one successful detection request of ``model``/``version`` (``None`` -> "none") run in ``precision``."""
    v = version or "none"
    LATENCY.labels(model, v).observe(seconds)
    DETECTIONS.labels(model, v).inc(detections)
    PRECISION_LATENCY.labels(model, precision).observe(seconds)


def exposition() -> tuple[bytes, str]:
    """The registry in Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
