"""Prometheus metrics and JSON log lines: the real daemon scraped over HTTP in its namespace.

The daemon runs inside the server namespace with metrics on 127.0.0.1 there;
the scrape runs in the same namespace (ip netns exec), and the page is parsed
with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from imr.config import MetricsConfig
from imr.server.jsonlog import JsonLinesFormatter

from daemon_harness import (
    BLOCKER,
    PYTHON,
    READER,
    Daemon,
    daemon_world,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

SCRAPE = r"""
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as reply:
    print(reply.headers["Content-Type"])
    sys.stdout.write(reply.read().decode())
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


# Configuration (no daemon) -------------------------------------------------------------


def test_metrics_are_off_and_loopback_by_default() -> None:
    config = MetricsConfig()
    assert not config.enabled
    assert (config.host, config.port) == ("127.0.0.1", 9737)
    assert MetricsConfig(listen="[::1]:9100").host == "::1"


@pytest.mark.parametrize("listen", ["0.0.0.0:9737", "[::]:9737", "192.0.2.1:9737"])
def test_a_non_loopback_listen_address_needs_allow_non_loopback(listen: str) -> None:
    with pytest.raises(ValidationError, match="allow_non_loopback"):
        MetricsConfig(enabled=True, listen=listen)
    assert MetricsConfig(enabled=True, listen=listen, allow_non_loopback=True).listen == listen


@pytest.mark.parametrize("listen", ["localhost:9737", "127.0.0.1", "127.0.0.1:0", ":9737"])
def test_listen_must_be_an_address_literal_and_port(listen: str) -> None:
    with pytest.raises(ValidationError):
        MetricsConfig(listen=listen)


# JSON log lines ---------------------------------------------------------------------------


def test_json_log_lines_carry_fields_and_stay_one_line() -> None:
    record = logging.LogRecord(
        "imr.broker", logging.WARNING, __file__, 1, "refused %s:\n%s", ("x", "next"), None
    )
    record.principal = "uid:33"
    record.code = "rate_limited"
    line = JsonLinesFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["level"] == "warning" and parsed["logger"] == "imr.broker"
    assert parsed["message"] == "refused x:\nnext"
    assert (parsed["principal"], parsed["code"]) == ("uid:33", "rate_limited")
    assert parsed["ts"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonLinesFormatter().format(record))["exc"]


# The real daemon ---------------------------------------------------------------------------


@pytest.fixture
def world(test_users: None) -> Iterator[Daemon]:
    with daemon_world() as daemon:
        yield daemon


def scrape(world: Daemon, url: str = "http://127.0.0.1:9737/metrics") -> tuple[str, Samples]:
    result = world.server.run(PYTHON, "-c", SCRAPE, url, check=False, timeout=10)
    assert result.returncode == 0, result.stderr
    content_type, _, page = result.stdout.partition("\n")
    samples: Samples = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return content_type, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@needs_root
def test_the_daemon_counts_requests_refusals_batches_and_expiries(world: Daemon) -> None:
    world.ladder = '["10s"]'
    world.extra_config = "\n[quota]\nblocks_per_minute = 2\n\n[metrics]\nenabled = true\n"
    world.write_config()
    result = world.start()
    assert result.returncode == 0, result.stderr

    _, before = scrape(world)
    assert value(before, "imr_active_blocks", backend="iptables") == 0

    assert world.as_user(BLOCKER, "block", "203.0.113.10").returncode == 0
    assert world.as_user(BLOCKER, "block", "203.0.113.11").returncode == 0
    assert world.as_user(BLOCKER, "block", "203.0.113.10").returncode == 0  # a hit
    assert "rate_limited" in world.as_user(BLOCKER, "block", "203.0.113.12").stderr
    assert "loopback_address" in world.as_user(BLOCKER, "block", "127.0.0.1").stderr
    assert "forbidden" in world.as_user(READER, "block", "203.0.113.13").stderr
    assert world.as_user(READER, "list").returncode == 0

    content_type, after = scrape(world)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert value(after, "imr_active_blocks", backend="iptables") == 2
    requests = "imr_requests_total"
    assert value(after, requests, op="block", role="block", result="ok") == 3
    assert value(after, requests, op="block", role="block", result="rate_limited") == 1
    assert value(after, requests, op="block", role="block", result="loopback_address") == 1
    assert value(after, requests, op="block", role="read", result="forbidden") == 1
    assert value(after, requests, op="list", role="read", result="ok") == 1
    assert value(after, "imr_refusals_total", reason="rate_limited") == 1
    assert value(after, "imr_refusals_total", reason="loopback_address") == 1
    assert value(after, "imr_refusals_total", reason="forbidden") == 1
    assert value(after, "imr_quota_refusals_total", limit="blocks_per_minute") == 1
    # Six block requests timed; three reached the writer, in one batch each.
    assert value(after, "imr_request_duration_seconds_count", op="block") == 6
    assert value(after, "imr_request_duration_seconds_sum", op="block") > 0
    assert value(after, "imr_batch_size_count") == 3
    assert value(after, "imr_batch_size_sum") == 3
    assert value(after, "imr_batch_size_bucket", le="1.0") == 3
    assert value(after, "imr_expiries_total") == 0

    # The 10-second blocks expire; the gauge and the counter follow.
    def expired() -> bool:
        return value(scrape(world)[1], "imr_expiries_total") == 2

    assert world.wait_for(expired, timeout=30)
    _, late = scrape(world)
    assert value(late, "imr_active_blocks", backend="iptables") == 0
    assert "-s 203.0.113.10/32" not in world.rules(4)


@needs_root
def test_metrics_stay_off_unless_enabled(world: Daemon) -> None:
    world.write_config()
    result = world.start()
    assert result.returncode == 0, result.stderr
    probe = world.server.run(
        PYTHON, "-c", SCRAPE, "http://127.0.0.1:9737/metrics", check=False, timeout=10
    )
    assert probe.returncode != 0 and "Connection refused" in probe.stderr


@needs_root
def test_a_busy_metrics_port_stops_the_start_with_a_clear_message(world: Daemon) -> None:
    world.extra_config = '\n[metrics]\nenabled = true\nlisten = "127.0.0.1:80"\n'
    world.write_config()
    world.listen(80)  # the harness's TCP listener holds 0.0.0.0:80 in the namespace
    result = world.start()
    assert result.returncode != 0
    assert "metrics.listen = '127.0.0.1:80': cannot listen" in result.stderr
    assert "Traceback" not in result.stderr
