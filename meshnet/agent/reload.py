"""What a reload (SIGHUP) changes, decided from config.py's table: the keys that differ between
the running configuration and the file read again, split into those applied at once and those
that keep their running value until a restart (and are named in the log). Pure."""

from __future__ import annotations

from dataclasses import dataclass, replace

from meshnet.config import KEYS, MEMBERSHIP, Config, live_keys

MEMBERSHIP_PREFIX = "membership."


@dataclass(frozen=True)
class ReloadPlan:
    live: frozenset[str]  # changed keys to apply now ([membership]'s as membership.KEY)
    restart: tuple[str, ...]  # changed keys that wait for a restart, in the table's order
    config: Config  # the running config with the live changes: what to run once they apply


def changed_keys(old: Config, new: Config) -> list[str]:
    """Keys whose values differ, in the table's order; [membership]'s one by one."""
    out = []
    for name in KEYS:
        if name == "membership":
            out += [f"{MEMBERSHIP_PREFIX}{k}" for k in MEMBERSHIP
                    if old.membership.get(k) != new.membership.get(k)]
        elif getattr(old, name) != getattr(new, name):
            out.append(name)
    return out


def plan(running: Config, fresh: Config) -> ReloadPlan:
    live = live_keys()
    changed = changed_keys(running, fresh)
    now = [k for k in changed if k in live]
    top = {k: getattr(fresh, k) for k in now if not k.startswith(MEMBERSHIP_PREFIX)}
    membership = dict(running.membership)
    for key in now:
        if key.startswith(MEMBERSHIP_PREFIX):
            sub = key.removeprefix(MEMBERSHIP_PREFIX)
            if sub in fresh.membership:
                membership[sub] = fresh.membership[sub]
            else:  # an override taken out: back to the profile's value
                membership.pop(sub, None)
    return ReloadPlan(live=frozenset(now),
                      restart=tuple(k for k in changed if k not in live),
                      config=replace(running, **top, membership=membership))
