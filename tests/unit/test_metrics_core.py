"""meshnet/metrics.py: histograms, the Prometheus text format, the status walk, lag and the
/health verdict (#16)."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshnet.metrics import (
    LAG_UNHEALTHY_S,
    Exposition,
    HealthInputs,
    Histogram,
    LagWindow,
    MonotonicSum,
    add_status,
    health_verdict,
    rcode_name,
    status_leaves,
)


def parsed(text: str) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """family name -> {(sample name, sorted labels): value}, as Prometheus' own parser reads
    TEXT (it raises on anything malformed)."""
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
    return out


def test_histogram_counts_a_value_equal_to_a_bound_in_that_bucket() -> None:
    h = Histogram([0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    h.observe(math.nan)  # ignored, not poisoning the sum
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (math.inf, 5)]
    assert h.count == 5
    assert h.sum == pytest.approx(8.65)


@pytest.mark.parametrize("bounds", [[], [1.0, 1.0], [2.0, 1.0], [math.inf], [math.nan]])
def test_histogram_refuses_bad_bounds(bounds: list[float]) -> None:
    with pytest.raises(ValueError):
        Histogram(bounds)


def test_exposition_has_help_and_type_and_parses_back() -> None:
    e = Exposition()
    e.counter("meshnet_x_total", "a count", 3)
    e.gauge("meshnet_level", "a level", 1.5, {"state": "alive"})
    e.gauge("meshnet_level", "a level", 2, {"state": "dead"})
    h = Histogram([0.5])
    h.observe(0.25)
    h.observe(2.0)
    e.histogram("meshnet_wait_seconds", "waits", h, {"kind": "a"})
    text = e.render()
    lines = text.splitlines()
    assert lines[:3] == ["# HELP meshnet_x_total a count", "# TYPE meshnet_x_total counter",
                         "meshnet_x_total 3"]
    assert "# TYPE meshnet_wait_seconds histogram" in lines
    assert 'meshnet_wait_seconds_bucket{kind="a",le="+Inf"} 2' in lines
    fams = parsed(text)
    assert fams["meshnet_x"][("meshnet_x_total", ())] == 3
    assert fams["meshnet_level"][("meshnet_level", (("state", "dead"),))] == 2
    wait = fams["meshnet_wait_seconds"]
    assert wait[("meshnet_wait_seconds_bucket", (("kind", "a"), ("le", "0.5")))] == 1
    assert wait[("meshnet_wait_seconds_sum", (("kind", "a"),))] == 2.25


def test_label_values_and_help_are_escaped() -> None:
    e = Exposition()
    nasty = 'a "quoted" \\ back\nslash'
    e.gauge("meshnet_g", 'help with \\ and\nnewline "quotes"', 1, {"reason": nasty})
    text = e.render()
    assert len(text.splitlines()) == 3  # nothing broke a line
    assert 'reason="a \\"quoted\\" \\\\ back\\nslash"' in text
    fam = next(iter(text_string_to_metric_families(text)))
    assert fam.documentation == 'help with \\ and\nnewline "quotes"'
    assert fam.samples[0].labels == {"reason": nasty}


def test_exposition_refuses_what_prometheus_would() -> None:
    e = Exposition()
    with pytest.raises(ValueError, match="must end in _total"):
        e.counter("meshnet_count", "no suffix", 1)
    with pytest.raises(ValueError, match="not valid"):
        e.gauge("meshnet-dash", "bad name", 1)
    with pytest.raises(ValueError, match="not valid"):
        e.gauge("meshnet_g", "reserved label", 1, {"__name__": "x"})
    e.gauge("meshnet_g", "ok", 1, {"a": "1"})
    with pytest.raises(ValueError, match="twice"):
        e.gauge("meshnet_g", "ok", 2, {"a": "1"})
    with pytest.raises(ValueError, match="added as counter and as gauge"):
        e.counter("meshnet_g", "other type", 1)


def test_values_render_as_prometheus_reads_them() -> None:
    e = Exposition()
    for i, v in enumerate([0, 7, 2.5, math.inf, -math.inf, True]):
        e.gauge("meshnet_v", "values", v, {"i": str(i)})
    e.gauge("meshnet_nan", "nan", math.nan)
    lines = e.render().splitlines()
    assert lines[2:8] == ['meshnet_v{i="0"} 0', 'meshnet_v{i="1"} 7', 'meshnet_v{i="2"} 2.5',
                          'meshnet_v{i="3"} +Inf', 'meshnet_v{i="4"} -Inf', 'meshnet_v{i="5"} 1']
    assert lines[-1] == "meshnet_nan NaN"
    assert len(parsed(e.render())["meshnet_v"]) == 6


STATUS = {
    "name": "h1", "version": "0.1.0", "incarnation": 17, "boots": 2, "uptime_s": 12.5,
    "identity": {"roles": ["admin"], "certs_known": 3, "refusals": {"bad sig": 2, "x.y": 1}},
    "members": {"alive": 3, "suspect": 0, "dead": 1, "left": 0},
    "datapath": {"overlay": {"kind": "vxlan", "mtu": 1450, "networks": 2, "passes": 40},
                 "encrypted": {"running": True, "gso": False, "handshake_drops": {"replay": 4},
                               "handshake_guard": {"under_load": False, "cookie_replies": 5}}},
    "gossip": {"probes": 120, "fresh_senders": 2, "streams_refused_total": 1},
    "store": {"entries": 9, "applied": 30, "refused_by_table": {"services": 1},
              "disk_full": False, "last": None},
    "dns": {"queries": 5, "max_in_flight": 1024},
}


def test_status_walk_takes_every_number_with_its_path() -> None:
    leaves = {leaf.path: leaf for leaf in status_leaves(STATUS)}
    # strings, lists and nulls are not numbers
    assert ("name",) not in leaves and ("store", "last") not in leaves
    assert ("identity", "roles") not in leaves
    assert leaves[("gossip", "probes")].name == "meshnet_status_gossip_probes_total"
    assert leaves[("gossip", "probes")].kind == "counter"
    # already a _total: not doubled
    assert leaves[("gossip", "streams_refused_total")].name == \
        "meshnet_status_gossip_streams_refused_total"
    # levels are gauges: by key, by max_ prefix, whole sections, booleans
    assert leaves[("gossip", "fresh_senders")].kind == "gauge"
    assert leaves[("dns", "max_in_flight")].kind == "gauge"
    assert leaves[("members", "dead")].name == "meshnet_status_members_dead"
    assert leaves[("datapath", "encrypted", "running")].value == 1
    assert leaves[("datapath", "encrypted", "gso")].value == 0
    assert leaves[("store", "disk_full")].kind == "gauge"
    # seconds spelled out
    assert leaves[("uptime_s",)].name == "meshnet_status_uptime_seconds"
    assert leaves[("uptime_s",)].value == 12.5


def test_status_maps_of_reasons_become_labels() -> None:
    labelled = [leaf for leaf in status_leaves(STATUS) if leaf.labels]
    by = {(leaf.name, tuple(leaf.labels.items())): leaf.value for leaf in labelled
          if leaf.labels is not None}
    assert by == {
        ("meshnet_status_identity_refusals_total", (("reason", "bad sig"),)): 2,
        ("meshnet_status_identity_refusals_total", (("reason", "x.y"),)): 1,
        ("meshnet_status_datapath_encrypted_handshake_drops_total", (("reason", "replay"),)): 4,
        ("meshnet_status_store_refused_by_table_total", (("table", "services"),)): 1,
    }


def test_status_names_that_collide_keep_the_first() -> None:
    leaves = status_leaves({"a.b": 1, "a": {"b": 2}, "a_b": 3})
    assert [(leaf.name, leaf.value) for leaf in leaves] == [("meshnet_status_a_b_total", 1)]


def test_add_status_output_parses_and_holds_every_leaf() -> None:
    e = Exposition()
    e.gauge("meshnet_status_incarnation", "taken already, as another type", 0)
    n = add_status(e, STATUS)
    fams = parsed(e.render())
    samples = {name: v for fam in fams.values() for (name, _), v in fam.items()}
    for leaf in status_leaves(STATUS):
        assert leaf.name in samples, leaf
    assert n == len(status_leaves(STATUS)) - 1  # the one whose name was taken was skipped


def test_monotonic_sum_keeps_what_parts_counted_before_they_left_or_restarted() -> None:
    s = MonotonicSum()
    assert s.update({"a": 5, "b": 3}) == 8
    assert s.update({"a": 7, "b": 4}) == 11
    assert s.update({"a": 9}) == 13  # b left with 4
    assert s.update({"a": 1}) == 14  # a restarted: its 9 stays
    assert s.update({}) == 14


def test_lag_window_remembers_a_stall_for_one_to_two_windows() -> None:
    w = LagWindow(10.0, now=0.0)
    w.observe(1.0, 0.001)
    w.observe(3.0, 2.5)
    assert w.worst(5.0) == 2.5
    assert w.worst(12.0) == 2.5  # previous window
    assert w.worst(21.0) == 0.0  # two windows on: forgotten
    w.observe(22.0, -0.5)  # a timer early never counts as negative lag
    assert w.last == 0.0 and w.last_at == 22.0


def inputs(**kw: object) -> HealthInputs:
    base: dict[str, object] = dict(now=100.0, left=False, others_reachable=2, others_lost=0,
                                   join_targets=True, worst_lag=0.001, lag_monitor_at=99.8,
                                   lag_interval=0.5, stalled=())
    base.update(kw)
    return HealthInputs(**base)  # type: ignore[arg-type]


def test_health_is_ok_when_joined_and_loops_run() -> None:
    assert health_verdict(inputs()) == (True, "ok: 3 members reachable")


def test_health_alone_by_design_is_ok_but_not_when_join_targets_or_lost_members() -> None:
    ok, why = health_verdict(inputs(others_reachable=0, join_targets=False))
    assert ok and "alone" in why
    ok, why = health_verdict(inputs(others_reachable=0))
    assert not ok
    assert why == "no alive member besides itself while join targets are configured"
    ok, why = health_verdict(inputs(others_reachable=0, others_lost=2, join_targets=False))
    assert not ok and why.startswith("no alive member besides itself (2 dead")


def test_health_names_a_stalled_event_loop_or_loop() -> None:
    ok, why = health_verdict(inputs(worst_lag=LAG_UNHEALTHY_S + 1))
    assert not ok and why.startswith("event loop stalled: a timer fired 3.0 s late")
    ok, why = health_verdict(inputs(lag_monitor_at=90.0))
    assert not ok and why == "event loop stalled: the lag monitor last ran 10.0 s ago"
    ok, why = health_verdict(inputs(stalled=("overlay reconcile loop made no pass in 31 s",)))
    assert not ok and why == "stalled: overlay reconcile loop made no pass in 31 s"
    assert health_verdict(inputs(left=True)) == (False, "left the cluster")
    for _ok, reason in [health_verdict(inputs(worst_lag=9.0, others_reachable=0))]:
        assert "\n" not in reason  # one line, always


def test_rcode_names() -> None:
    assert [rcode_name(i) for i in (0, 2, 3, 5)] == ["NOERROR", "SERVFAIL", "NXDOMAIN",
                                                     "REFUSED"]
    assert rcode_name(15) == "15"
