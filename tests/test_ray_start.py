"""``init_ray``'s retry after a local start timed out: the failed start's dashboard can still
hold its port, so the retry asks for a new one (seen on the loaded 2-core machine: the retry died
with "Failed to bind to 127.0.0.1:PORT because it's already occupied", held by the first
attempt's dashboard process)."""

from __future__ import annotations

import os

import pytest


def test_a_retried_local_start_gets_a_fresh_dashboard_port(monkeypatch):
    import ray

    from raykd.train import fit

    calls: list[dict] = []

    def fake_init(**kwargs):
        calls.append(dict(kwargs))
        if len(calls) == 1:
            raise RuntimeError("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "unset")
    options = fit.local_ray_options()
    fit.init_ray(num_cpus=1, **options)
    assert len(calls) == 2
    first, second = calls[0]["dashboard_port"], calls[1]["dashboard_port"]
    assert first != second  # ... and the State API address every Ray process inherits follows
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{second}"
    # A cluster address is never retried.
    calls.clear()
    with pytest.raises(RuntimeError):
        fit.init_ray(address="ray://nowhere:1", num_cpus=1)
    assert len(calls) == 1
