"""meshnet-lab: test hosts as network namespaces on one machine, each running meshnetd."""

from meshnet.lab.lab import (
    DEFAULT_PREFIX,
    UNDERLAY_NET,
    HostStatus,
    Lab,
    LabError,
    default_prefix,
    default_run_dir,
)

__all__ = [
    "DEFAULT_PREFIX",
    "UNDERLAY_NET",
    "HostStatus",
    "Lab",
    "LabError",
    "default_prefix",
    "default_run_dir",
]
