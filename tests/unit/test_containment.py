"""meshnet/containment.py: Docker's capability rules, the option parsers, the replicated form
and the task hostname."""

from __future__ import annotations

from typing import Any

import pytest

from meshnet.containment import (
    ALL,
    CAP_NUMBERS,
    DEFAULT_CAPS,
    MAX_HOSTNAME,
    MAX_MOUNTS,
    MAX_PIDS,
    MIN_MEMORY,
    Containment,
    ContainmentError,
    Mount,
    cap_mask,
    effective_caps,
    from_args,
    from_value,
    normalize_cap,
    overlaps,
    parse_cpus,
    parse_memory,
    parse_mount,
    parse_pids,
    parse_user,
    task_hostname,
)

MiB = 1 << 20
GiB = 1 << 30

# --- capabilities ----------------------------------------------------------------------------


def test_docker_default_caps_mask() -> None:
    # The CapEff of a process in a default `docker run` container.
    assert cap_mask(DEFAULT_CAPS) == 0xA80425FB
    assert effective_caps((), ()) == DEFAULT_CAPS


def test_capability_numbers_match_linux() -> None:
    assert CAP_NUMBERS["CHOWN"] == 0
    assert CAP_NUMBERS["NET_ADMIN"] == 12
    assert CAP_NUMBERS["SYS_ADMIN"] == 21
    assert CAP_NUMBERS["MKNOD"] == 27
    assert CAP_NUMBERS["SETFCAP"] == 31
    assert CAP_NUMBERS["CHECKPOINT_RESTORE"] == 40
    assert sorted(CAP_NUMBERS.values()) == list(range(41))


def test_add_and_drop() -> None:
    caps = effective_caps({"NET_ADMIN"}, {"CHOWN", "NET_RAW"})
    assert caps == (DEFAULT_CAPS | {"NET_ADMIN"}) - {"CHOWN", "NET_RAW"}
    assert cap_mask(caps) == (0xA80425FB | 1 << 12) & ~(1 << 0) & ~(1 << 13)


def test_all_in_add_gives_every_capability() -> None:
    assert effective_caps({ALL}, ()) == frozenset(CAP_NUMBERS)
    assert cap_mask(effective_caps({ALL}, ())) == (1 << 41) - 1
    # ... but an explicit drop still removes one.
    assert effective_caps({ALL}, {"SYS_ADMIN"}) == frozenset(CAP_NUMBERS) - {"SYS_ADMIN"}


def test_all_in_drop_starts_from_nothing() -> None:
    assert effective_caps((), {ALL}) == frozenset()
    assert effective_caps({"NET_BIND_SERVICE"}, {ALL}) == {"NET_BIND_SERVICE"}


def test_drop_then_add_the_same_capability_keeps_it() -> None:
    # Docker removes the dropped ones first, then adds the added ones.
    assert "CHOWN" in effective_caps({"CHOWN"}, {"CHOWN"})
    assert "NET_ADMIN" in effective_caps({"NET_ADMIN"}, {"NET_ADMIN"})


@pytest.mark.parametrize("text", ["net_admin", "NET_ADMIN", "CAP_NET_ADMIN", "cap_net_admin",
                                  " Net_Admin "])
def test_normalize_cap_accepts_spellings(text: str) -> None:
    assert normalize_cap(text, "--cap-add") == "NET_ADMIN"


def test_normalize_cap_all() -> None:
    assert normalize_cap("all", "--cap-drop") == ALL
    assert normalize_cap("CAP_ALL", "--cap-drop") == ALL


@pytest.mark.parametrize("text", ["NET_ADMINX", "", "CAP_", "SYS-ADMIN", "net admin", 12,
                                  None, b"NET_ADMIN", ["NET_ADMIN"]])
def test_normalize_cap_rejects(text: Any) -> None:
    with pytest.raises(ContainmentError, match="--cap-add"):
        normalize_cap(text, "--cap-add")


# --- limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("7340032", 7 * MiB),
    ("7340032b", 7 * MiB),
    ("7340032B", 7 * MiB),
    ("8192k", 8 * MiB),
    ("8192K", 8 * MiB),
    ("8192kb", 8 * MiB),
    ("6m", MIN_MEMORY),
    ("256m", 256 * MiB),
    ("256M", 256 * MiB),
    ("256MB", 256 * MiB),
    ("256 MB", 256 * MiB),
    (" 256m\n", 256 * MiB),
    ("1g", GiB),
    ("2GB", 2 * GiB),
    ("1.5g", 3 * GiB // 2),
    ("0.5g", 512 * MiB),
    ("1t", 1 << 40),
    ("1p", 1 << 50),
    (64 * MiB, 64 * MiB),
])
def test_parse_memory_units(text: str | int, value: int) -> None:
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", [
    "6291455", str(MIN_MEMORY - 1), "5m", "1k", "512", "0", 0, MIN_MEMORY - 1, -1,
    "1025t", (1 << 50) + 1, "2p",
    "", "abc", "m", "12x", "-1g", "1e9", "1,5g", "1.g", ".5g", "0x100000", "1 g b", "256MiB",
    "\uff12\uff15\uff16M", "\u0662\u0665\u0666M",  # 256M in fullwidth, Arabic-Indic digits
    True, False, 256.0 * MiB, None, b"256m", ["256m"],
])
def test_parse_memory_rejects(text: Any) -> None:
    with pytest.raises(ContainmentError, match="--limit-memory"):
        parse_memory(text)


@pytest.mark.parametrize(("parse", "value"), [
    (parse_memory, "9" * 400),          # float() gives inf, int(inf) overflows
    (parse_memory, "9" * 309 + "k"),
    (parse_memory, "1" + "0" * 400 + ".5g"),
    (parse_memory, 10 ** 400),
    (parse_cpus, 10 ** 400),            # float(int) overflows (a JSON spec can hold this)
    (parse_cpus, -(10 ** 309)),
    (parse_cpus, "9" * 400),
    (parse_pids, 10 ** 400),
    (parse_pids, "9" * 400),
], ids=["memory-400-digits", "memory-309-digits-k", "memory-400-digits-g", "memory-10**400",
        "cpus-10**400", "cpus--10**309", "cpus-400-digits", "pids-10**400", "pids-400-digits"])
def test_huge_numbers_are_containment_errors(parse: Any, value: Any) -> None:
    with pytest.raises(ContainmentError):
        parse(value)


def test_from_value_huge_numbers_are_containment_errors() -> None:
    # services.py catches (ContainmentError, TypeError, ValueError) around from_value and
    # _containment_json only ContainmentError: an OverflowError would escape both.
    for value in ({"memory": "9" * 400}, {"cpus": 10 ** 400}, {"pids": 10 ** 400}):
        with pytest.raises(ContainmentError):
            from_value(value)


@pytest.mark.parametrize(("text", "value"), [
    (0.5, 0.5), ("0.5", 0.5), ("1", 1.0), (1, 1.0), (2, 2.0), ("0.01", 0.01), (1024, 1024.0),
    (" 1.5 ", 1.5), (1 / 3, 0.333),
])
def test_parse_cpus(text: Any, value: float) -> None:
    assert parse_cpus(text) == value


@pytest.mark.parametrize("text", [
    0, "0", 0.0, 0.009, "0.001", -1, "-0.5", 1025, 1024.5, float("nan"), "nan", float("inf"),
    "inf", "-inf", True, False, "", "abc", "1 cpu", None, [1], b"1",
])
def test_parse_cpus_rejects(text: Any) -> None:
    with pytest.raises(ContainmentError, match="--limit-cpu"):
        parse_cpus(text)


@pytest.mark.parametrize("text", ["\u0660.\u0665", "\uff11", "\uff11.\uff15", "1_000", "0_1"])
def test_parse_cpus_rejects_non_ascii_digits_and_underscores(text: str) -> None:
    # As --limit-memory and --limit-pids do (and Docker's strconv.ParseFloat): float() alone
    # would take Arabic-Indic or fullwidth digits and Python's digit separators.
    with pytest.raises(ContainmentError, match="--limit-cpu"):
        parse_cpus(text)


@pytest.mark.parametrize(("text", "value"), [
    (1, 1), (64, 64), ("64", 64), (" 64 ", 64), (MAX_PIDS, MAX_PIDS), (str(MAX_PIDS), MAX_PIDS),
])
def test_parse_pids(text: Any, value: int) -> None:
    assert parse_pids(text) == value


def test_parse_pids_trailing_newline_is_stripped_like_other_whitespace() -> None:
    # The code strips surrounding whitespace before the ASCII-digit check, so a trailing
    # newline is treated exactly like a space.
    assert parse_pids("64\n") == parse_pids("64") == parse_pids(" 64 ") == 64


@pytest.mark.parametrize("text", [
    0, "0", -1, "-1", MAX_PIDS + 1, str(MAX_PIDS + 1), "99999999999", "6 4",
    "\u0663", "\uff13", "64\u0663",  # Arabic-Indic 3, fullwidth 3
    "0x10", "1e3", "1.0", 1.0, 64.5, True, False, None, "", [64], b"64",
])
def test_parse_pids_rejects(text: Any) -> None:
    with pytest.raises(ContainmentError, match="--limit-pids"):
        parse_pids(text)


# --- user ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "parsed"), [
    ("65534", (65534, None)),
    ("0", (0, None)),
    ("65534:100", (65534, 100)),
    ("nobody", ("nobody", None)),
    ("nobody:nogroup", ("nobody", "nogroup")),
    ("1000:nogroup", (1000, "nogroup")),
    ("_apt", ("_apt", None)),
    ("machine$", ("machine$", None)),
    ("4294967294", (4294967294, None)),
])
def test_parse_user(text: str, parsed: tuple[Any, Any]) -> None:
    assert parse_user(text) == parsed


def test_parse_user_empty_is_root() -> None:
    assert parse_user("") is None
    assert parse_user(None) is None


@pytest.mark.parametrize("text", [
    ":", "1:", ":1", "nobody:", "a b", "a:b c", "x" * 81, "x" * 33, "1:2:3", "Nobody", "-x",
    "4294967295", "99999999999", "a/b", 65534, True, b"nobody", ["nobody"],
    "\u0663", "\uff11",  # non-ASCII digits
])
def test_parse_user_rejects(text: Any) -> None:
    with pytest.raises(ContainmentError, match="--user"):
        parse_user(text)


@pytest.mark.parametrize("text", ["nobody\n", "65534\n", "1:2\n", "nobody\n:nogroup"])
def test_parse_user_rejects_trailing_newline(text: str) -> None:
    # The node resolves the user with getpwnam()/int(): "nobody\n" must not pass the check on
    # `service create` only to fail on every node that tries to start the task.
    with pytest.raises(ContainmentError, match="--user"):
        parse_user(text)


# --- mounts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "mount"), [
    ("type=bind,source=/a,target=/b", Mount("/a", "/b", False)),
    ("type=bind,source=/a,target=/b,readonly", Mount("/a", "/b", True)),
    ("source=/a,target=/b", Mount("/a", "/b", False)),
    ("src=/a,dst=/b", Mount("/a", "/b", False)),
    ("src=/a,destination=/b,ro", Mount("/a", "/b", True)),
    ("src=/a,dst=/b,ro=true", Mount("/a", "/b", True)),
    ("src=/a,dst=/b,readonly=1", Mount("/a", "/b", True)),
    ("src=/a,dst=/b,readonly=yes", Mount("/a", "/b", True)),
    ("src=/a,dst=/b,readonly=false", Mount("/a", "/b", False)),
    ("src=/a,dst=/b,readonly=0", Mount("/a", "/b", False)),
    ("SRC=/a, DST=/b, RO", Mount("/a", "/b", True)),
    ("source=/a/./b//,target=//c/", Mount("/a/b", "/c", False)),
    ("source=/,target=/host", Mount("/", "/host", False)),
    ("source=/srv/data,target=/procfs", Mount("/srv/data", "/procfs", False)),
    ("source=/srv/data,target=/system", Mount("/srv/data", "/system", False)),
    ("source=/srv/data,target=/etc/resolv.conf.d", Mount("/srv/data", "/etc/resolv.conf.d",
                                                         False)),
    ("source=/srv/data,target=/device", Mount("/srv/data", "/device", False)),
])
def test_parse_mount(text: str, mount: Mount) -> None:
    assert parse_mount(text) == mount


def test_parse_mount_mapping_form() -> None:
    assert parse_mount({"source": "/a", "target": "/b", "readonly": True}) == \
        Mount("/a", "/b", True)
    assert parse_mount({"source": "/a/", "target": "/b"}) == Mount("/a", "/b", False)
    with pytest.raises(ContainmentError):
        parse_mount({"source": "/a"})
    with pytest.raises(ContainmentError):
        parse_mount({"source": "/a", "target": "/proc"})
    with pytest.raises(ContainmentError):
        parse_mount({"source": "/a", "target": "/b", "readonly": None})


@pytest.mark.parametrize("text", [
    "type=bind,source=a,target=/b",
    "type=bind,source=/a,target=b",
    "type=bind,source=,target=/b",
    "type=bind,source=/a/../etc,target=/b",
    "type=bind,source=/a,target=/b/..",
    "type=bind,source=/a,target=/../proc",
    "type=bind,source=/a,target=/b,foo=1",
    "type=bind,source=/a,target=/b,propagation=rshared",
    "type=volume,source=/a,target=/b",
    "type=tmpfs,target=/b",
    "type=BIND,source=/a,target=/b",
    "source=/a",
    "target=/b",
    "source=/a,target",
    "/a:/b",
    "",
    "source=/a,target=/b,readonly=maybe",
    "source=/a\0x,target=/b",
    "source=/a\nx,target=/b",
    "source=/" + "a" * 1024 + ",target=/b",
])
def test_parse_mount_rejects(text: str) -> None:
    with pytest.raises(ContainmentError, match="--mount"):
        parse_mount(text)


@pytest.mark.parametrize("target", [
    "/", "//", "/.", "/proc", "/proc/", "//proc", "/./proc", "/proc/x", "/proc/sys/net",
    "/sys", "/sys/fs/cgroup", "/dev", "/dev/shm", "/dev/null", "/etc/resolv.conf",
    "/etc//resolv.conf", "/etc/hosts", "/etc/hostname",
])
def test_parse_mount_rejects_managed_targets(target: str) -> None:
    with pytest.raises(ContainmentError, match="managed by meshnet"):
        parse_mount(f"type=bind,source=/srv,target={target}")


@pytest.mark.parametrize("value", [5, None, b"source=/a,target=/b", ["source=/a,target=/b"]])
def test_parse_mount_rejects_other_types(value: Any) -> None:
    with pytest.raises(ContainmentError, match="--mount"):
        parse_mount(value)


def test_mount_str() -> None:
    assert str(Mount("/a", "/b")) == "/a:/b"
    assert str(Mount("/a", "/b", True)) == "/a:/b:ro"


# --- the replicated form -----------------------------------------------------------------------

FULL = Containment(
    cap_add=("NET_ADMIN", "SYS_PTRACE"), cap_drop=("CHOWN",), user="nobody:nogroup",
    memory=256 * MiB, cpus=0.5, pids=64,
    mounts=(Mount("/srv/data", "/data", True), Mount("/srv/logs", "/var/log/app")))


def test_round_trip() -> None:
    value = FULL.to_value()
    assert value == {
        "cap_add": ["NET_ADMIN", "SYS_PTRACE"], "cap_drop": ["CHOWN"], "user": "nobody:nogroup",
        "memory": 256 * MiB, "cpus": 0.5, "pids": 64,
        "mounts": [{"source": "/srv/data", "target": "/data", "readonly": True},
                   {"source": "/srv/logs", "target": "/var/log/app", "readonly": False}]}
    assert from_value(value) == FULL
    assert from_value(FULL.to_value()).to_value() == value


def test_empty_containment() -> None:
    assert Containment().to_value() == {}
    assert from_value(None) == Containment()
    assert from_value({}) == Containment()
    assert not Containment().has_limits
    assert FULL.has_limits


def test_from_value_normalizes() -> None:
    c = from_value({"cap_add": ["sys_ptrace", "CAP_NET_ADMIN", "net_admin"],
                    "cap_drop": ("chown",), "memory": "256m", "cpus": "0.5", "pids": "64",
                    "user": "nobody:nogroup",
                    "mounts": ["src=/srv/data/,dst=/data,ro",
                               {"source": "/srv/logs", "target": "/var/log/app/"}]})
    assert c == FULL


@pytest.mark.parametrize("value", [
    {"memory": "1g", "limit_memory": "1g"},
    {"capabilities": []},
    {"": 1},
    {1: 2},
    {b"user": "nobody"},
])
def test_from_value_rejects_unknown_keys(value: dict[Any, Any]) -> None:
    with pytest.raises(ContainmentError, match="unknown key"):
        from_value(value)


def test_from_value_rejects_duplicate_targets() -> None:
    with pytest.raises(ContainmentError, match="share a target"):
        from_value({"mounts": ["src=/a,dst=/x", "src=/b,dst=/x"]})
    with pytest.raises(ContainmentError, match="share a target"):
        from_value({"mounts": ["src=/a,dst=/x", {"source": "/b", "target": "//x/./"}]})


def test_from_value_mount_count() -> None:
    mounts = [f"src=/s{i},dst=/t{i}" for i in range(MAX_MOUNTS + 1)]
    assert len(from_value({"mounts": mounts[:MAX_MOUNTS]}).mounts) == MAX_MOUNTS
    with pytest.raises(ContainmentError, match="at most"):
        from_value({"mounts": mounts})


@pytest.mark.parametrize("value", [[], ["memory"], "memory=1g", 5, 1.5, True, b"{}",
                                   ("user", "x")])
def test_from_value_rejects_non_mapping(value: Any) -> None:
    with pytest.raises(ContainmentError, match="not a mapping"):
        from_value(value)


@pytest.mark.parametrize("value", [
    {"cap_add": "NET_ADMIN"},
    {"cap_add": ["NOPE"]},
    {"cap_drop": [1]},
    {"cap_add": ["CHOWN"] * 100},
    {"user": 0},
    {"user": ":"},
    {"memory": "1m"},
    {"memory": True},
    {"cpus": "nan"},
    {"pids": 0},
    {"mounts": "src=/a,dst=/b"},
    {"mounts": [{"source": "/a", "target": "/dev/x"}]},
    {"mounts": [5]},
])
def test_from_value_rejects_bad_fields(value: dict[str, Any]) -> None:
    with pytest.raises(ContainmentError):
        from_value(value)


def test_from_args_maps_the_flags() -> None:
    c = from_args({"limit_memory": "256m", "limit_cpu": "0.5", "limit_pids": 64,
                   "mounts": ["type=bind,source=/srv/data,target=/data,readonly",
                              "src=/srv/logs,dst=/var/log/app"],
                   "cap_add": ["net_admin", "sys_ptrace"], "cap_drop": ["chown"],
                   "user": "nobody:nogroup", "network": "web", "command": ["sh"]})
    assert c == FULL


def test_from_args_empty_flags_mean_defaults() -> None:
    assert from_args({}) == Containment()
    assert from_args({"cap_add": [], "cap_drop": [], "user": "", "mounts": [],
                      "limit_memory": None, "limit_cpu": None, "limit_pids": None}) == \
        Containment()


def test_from_args_checks() -> None:
    with pytest.raises(ContainmentError, match="--limit-memory"):
        from_args({"limit_memory": "1k"})
    with pytest.raises(ContainmentError, match="--limit-cpu"):
        from_args({"limit_cpu": 0})
    with pytest.raises(ContainmentError, match="--limit-pids"):
        from_args({"limit_pids": "lots"})


def test_summary_shape() -> None:
    assert Containment().summary() == {"user": "0", "capabilities": sorted(DEFAULT_CAPS),
                                       "limits": {}, "mounts": []}
    s = FULL.summary()
    assert set(s) == {"user", "capabilities", "limits", "mounts"}
    assert s["user"] == "nobody:nogroup"
    assert s["capabilities"] == sorted((DEFAULT_CAPS | {"NET_ADMIN", "SYS_PTRACE"}) - {"CHOWN"})
    assert s["limits"] == {"memory": 256 * MiB, "cpus": 0.5, "pids": 64}
    assert s["mounts"] == ["/srv/data:/data:ro", "/srv/logs:/var/log/app"]
    assert Containment(pids=5).summary()["limits"] == {"pids": 5}


# --- hostname, overlaps -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web.1", "a", "x" * MAX_HOSTNAME])
def test_task_hostname_short_names_unchanged(name: str) -> None:
    assert task_hostname(name) == name


def test_task_hostname_long_names() -> None:
    a = "a" * 99 + "1"
    b = "a" * 99 + "2"
    ha, hb = task_hostname(a), task_hostname(b)
    assert len(ha) == len(hb) == MAX_HOSTNAME == 63
    assert ha != hb
    assert ha.startswith("a" * 54 + "-")
    assert task_hostname(a) == ha  # stable
    assert len(task_hostname("x" * (MAX_HOSTNAME + 1))) == MAX_HOSTNAME


@pytest.mark.parametrize(("path", "others", "found"), [
    ("/etc", ["/etc/shadow"], "/etc/shadow"),
    ("/etc/shadow", ["/etc"], "/etc"),
    ("/etc/shadow", ["/etc/shadow"], "/etc/shadow"),
    ("/etc/", ["/etc"], "/etc"),
    ("/etc", ["/etc/"], "/etc"),
    ("/etcetera", ["/etc"], None),
    ("/etc", ["/etcetera"], None),
    ("/srv/data", ["/srv/dat", "/srv/data2", "/tmp"], None),
    ("/", ["/x"], "/x"),
    ("/x/y", ["/"], "/"),
    ("/a/b", ["/c", "/a", "/a/b"], "/a"),
    ("/a", [], None),
])
def test_overlaps(path: str, others: list[str], found: str | None) -> None:
    assert overlaps(path, others) == found


# --- display: meshctl's short forms and what a peer's published summary may carry -------------


def test_describe_caps_is_a_difference_from_dockers_set() -> None:
    from meshnet.containment import describe_caps

    assert describe_caps(DEFAULT_CAPS) == "default"
    assert describe_caps(DEFAULT_CAPS | {"NET_ADMIN"}) == "default+NET_ADMIN"
    assert describe_caps(DEFAULT_CAPS - {"NET_RAW"}) == "default-NET_RAW"
    assert describe_caps(set()) == "none"


def test_describe_limits() -> None:
    from meshnet.containment import describe_limits

    assert describe_limits({}) == "-"
    assert describe_limits({"memory": 64 << 20, "cpus": 0.5, "pids": 64}) == \
        "memory=64M cpus=0.5 pids=64"
    assert describe_limits({"memory": (1 << 30) + 1}) == f"memory={(1 << 30) + 1}"
    assert describe_limits({"memory": 3 << 30}) == "memory=3G"


def test_summary_view_keeps_only_well_typed_fields() -> None:
    from meshnet.containment import summary_view

    good = Containment(user="65534", memory=64 << 20).summary()
    assert summary_view(good) == {"user": "65534", "capabilities": good["capabilities"],
                                  "limits": {"memory": 64 << 20}}
    assert summary_view({"user": b"x", "capabilities": ["A", 1], "limits": {"memory": True}}) \
        == {}
    assert summary_view("nonsense") == {}


def test_meshctl_renders_service_inspect_with_short_forms() -> None:
    from meshnet.cli.meshctl import render

    doc = {"name": "web", "command": ["sleep", "1"],
           "containment": Containment(cap_drop=("NET_RAW",), pids=50).summary(),
           "tasks": [{"task": "web.1", "node": "h1", "state": "running", "ip": "10.0.0.2",
                      "user": "0", "capabilities": sorted(DEFAULT_CAPS), "limits": {}}]}
    out = render("service inspect", doc)
    assert "capabilities: default-NET_RAW" in out and "limits: pids=50" in out, out
    assert "command: sleep 1" in out
    assert any(line.startswith("web.1") and "default" in line for line in out.splitlines())
    assert "tasks:" not in render("service create", {k: v for k, v in doc.items()
                                                     if k != "tasks"})
