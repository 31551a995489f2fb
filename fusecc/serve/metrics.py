"""Prometheus metrics of one server: latency histograms observed per request, engine state read at scrape.

    metrics = ServerMetrics(engine)            # its own CollectorRegistry: two apps never share series
    metrics.observe_request(final_output, itls=[...])
    body = metrics.render()                    # Prometheus text format for GET /metrics

The engine's cumulative counters (tokens, preemptions, prefix-cache queries and hits, finished
requests by reason) and its gauges (running, waiting, KV-cache usage) come from `engine.stats()`
at scrape time, so they count every request the engine saw, including aborted ones, and cannot
drift from the engine's own numbers.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. TTFT and end-to-end span prefill of long prompts on a busy server; ITL is per decode step.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


class _EngineStatsCollector(Collector):
    """Reads engine.stats() once per scrape."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        s = self.engine.stats()
        yield GaugeMetricFamily("fusecc_num_requests_running", "Requests in the running batch.", s.num_running)
        yield GaugeMetricFamily("fusecc_num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield GaugeMetricFamily("fusecc_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                                s.kv_cache_usage)
        for name, doc, value in (
            ("fusecc_prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total),
            ("fusecc_generation_tokens", "Tokens generated.", s.generation_tokens_total),
            ("fusecc_num_preemptions", "Sequences preempted (recomputed) for lack of KV blocks.", s.num_preemptions),
            ("fusecc_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("fusecc_prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        finished = CounterMetricFamily("fusecc_requests_finished", "Finished requests by finish reason.",
                                       labels=["reason"])
        for reason in sorted(set(s.finished_by_reason) | {"stop", "length", "abort"}):
            finished.add_metric([reason], s.finished_by_reason.get(reason, 0))
        yield finished
        spec = getattr(s, "spec_decode", None)
        if spec is not None:  # speculative decoding (vLLM's spec_decode_* series)
            for name, doc, value in (
                ("fusecc_spec_decode_num_drafts", "Verification windows (a sequence verifying drafts in a step).",
                 spec.num_drafts),
                ("fusecc_spec_decode_num_draft_tokens", "Draft tokens proposed and verified.", spec.num_draft_tokens),
                ("fusecc_spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens),
            ):
                yield CounterMetricFamily(name, doc, value=value)
            yield GaugeMetricFamily("fusecc_spec_decode_acceptance_rate", "Accepted / drafted tokens since start.",
                                    spec.acceptance_rate)
            yield GaugeMetricFamily("fusecc_spec_decode_mean_accepted_length",
                                    "Tokens per verification window: 1 + accepted drafts per window.",
                                    spec.mean_accepted_length)


class ServerMetrics:
    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("fusecc_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("fusecc_inter_token_latency_seconds", "Time between successive streamed outputs.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("fusecc_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("fusecc_request_queue_time_seconds", "Time from arrival to first scheduled.",
                                    buckets=_TTFT_BUCKETS, registry=r)
        # Every label value is bounded: a series per client-chosen value (a made-up method or
        # path) would let any client grow the registry, and each scrape, without limit.
        self.http_requests = Counter("fusecc_http_requests", "HTTP requests by route and status.",
                                     ["method", "route", "status"], registry=r)
        r.register(_EngineStatsCollector(engine))

    def observe_request(self, metrics, itls: list[float]) -> None:
        """metrics: the final RequestOutput.metrics of one request; itls: its inter-output gaps in seconds."""
        arrival = metrics.arrival_time
        if metrics.first_token_time is not None:
            self.ttft.observe(max(0.0, metrics.first_token_time - arrival))
        if metrics.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, metrics.first_scheduled_time - arrival))
        if metrics.finished_time is not None:
            self.e2e.observe(max(0.0, metrics.finished_time - arrival))
        for gap in itls:
            self.itl.observe(gap)

    def count_http(self, method: str, route: str, status: int) -> None:
        """route: a known route or "other" (the caller knows the routes); unknown methods fold into "other"."""
        self.http_requests.labels(method if method in _METHODS else "other", route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
