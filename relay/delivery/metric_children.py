"""The labelled children of the delivery metrics, each looked up once.

``metric.labels(...)`` validates and locks on every call; a delivery records four
metrics, so the worker keeps the children it has used, per label set (bounded as
Prometheus' own: tenants x sinks x outcomes).
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)


class MetricChildren:
    def __init__(self) -> None:
        self._found: dict[tuple[int, tuple[str, ...]], Any] = {}

    def of(self, metric: M, *labels: str) -> M:
        key = (id(metric), labels)
        found = self._found.get(key)
        if found is None:
            found = self._found[key] = metric.labels(*labels)
        return found
