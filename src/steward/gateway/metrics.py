"""Prometheus metrics, one registry per app (several apps in one test process stay separate).

Per worker process: with `--workers N` each worker exports its own series, labelled by `pid`.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from steward.gateway.trace import Trace

_BUCKETS_MS = (0.5, 1, 2, 3, 5, 10, 15, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        pid = str(os.getpid())
        self.requests = Counter(
            "steward_requests_total",
            "Requests by route, model, status and outcome",
            ["route", "model", "status", "outcome"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "steward_tokens_total", "Tokens by model and kind", ["model", "kind"], registry=self.registry
        )
        self.latency = Histogram(
            "steward_request_latency_ms",
            "Total request latency (ms)",
            ["route"],
            buckets=_BUCKETS_MS,
            registry=self.registry,
        )
        self.overhead = Histogram(
            "steward_overhead_ms",
            "Time spent in Steward, backend excluded (ms)",
            ["route"],
            buckets=_BUCKETS_MS,
            registry=self.registry,
        )
        self.info = Gauge("steward_worker_info", "Worker process", ["pid"], registry=self.registry)
        self.info.labels(pid=pid).set(1)
        # labels() takes a lock and validates its arguments on every call; a request only needs the
        # child series, which never change once made.
        self._children: dict[tuple[str, ...], tuple[Any, ...]] = {}

    def observe(self, trace: Trace) -> None:
        model = trace.model or "-"
        key = (trace.route, model, str(trace.status), trace.outcome)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(*key),
                self.latency.labels(trace.route),
                self.overhead.labels(trace.route),
                self.tokens.labels(model, "prompt"),
                self.tokens.labels(model, "completion"),
            )
            if len(self._children) < 10_000:  # label values come from routes, models, statuses
                self._children[key] = children
        requests, latency, overhead, prompt, completion = children
        requests.inc()
        total = trace.latency_ms.get("total", 0.0)
        latency.observe(total)
        overhead.observe(max(total - trace.backend_s * 1000, 0.0))
        for kind, counter in (("prompt_tokens", prompt), ("completion_tokens", completion)):
            v = trace.usage.get(kind)
            if isinstance(v, int | float) and v > 0:
                counter.inc(v)

    def render(self) -> bytes:
        return generate_latest(self.registry)
