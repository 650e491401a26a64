"""Prometheus metrics at ``GET /metrics`` (the ``prometheus_client`` library, text exposition format).

Per server (one registry each): ``glm2_requests_total{outcome}`` (``stop``, ``length``, ``error``,
``abandoned``: the client went away, ``refused``: the queue was full), ``glm2_prompt_tokens_total`` and
``glm2_generation_tokens_total`` (what the finished requests used), the gauges
``glm2_requests_running`` (batch rows in use), ``glm2_requests_waiting``, ``glm2_batch_rows`` (``--max-batch``)
and ``glm2_decode_steps`` (batched decode steps so far), and the histograms
``glm2_time_to_first_token_seconds`` (from the request's arrival), ``glm2_time_per_output_token_seconds``
(between two tokens of one request) and ``glm2_e2e_request_latency_seconds``.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The scheduler's observer (``scheduler.observer = Metrics(scheduler)``) and the ``/metrics`` text."""

    def __init__(self, scheduler):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("glm2_requests", "Requests by how they ended", ["outcome"], registry=r)
        for outcome in ("stop", "length", "error", "abandoned", "refused"):
            self.requests.labels(outcome)
        self.prompt_tokens = Counter("glm2_prompt_tokens", "Prompt tokens of the finished requests", registry=r)
        self.generation_tokens = Counter("glm2_generation_tokens", "Tokens generated", registry=r)
        Gauge("glm2_requests_running", "Batch rows in use", registry=r).set_function(
            lambda: scheduler.stats()["active"])
        Gauge("glm2_requests_waiting", "Requests waiting for a row", registry=r).set_function(
            lambda: scheduler.stats()["waiting"])
        Gauge("glm2_batch_rows", "Rows decoded together (--max-batch)", registry=r).set_function(
            lambda: scheduler.decoder.max_batch)
        Gauge("glm2_decode_steps", "Batched decode steps so far", registry=r).set_function(lambda: scheduler.steps)
        self.ttft = Histogram("glm2_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("glm2_time_per_output_token_seconds", "Between two tokens of a request",
                              buckets=_TOKEN, registry=r)
        self.e2e = Histogram("glm2_e2e_request_latency_seconds", "Arrival to the end", buckets=_LATENCY, registry=r)
        scheduler.observer = self

    # the scheduler's calls
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def ended(self, outcome: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.requests.labels(outcome).inc()
        if outcome != "refused":
            self.prompt_tokens.inc(prompt_tokens)
            self.generation_tokens.inc(completion_tokens)
            self.e2e.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
