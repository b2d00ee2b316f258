"""Loading this node's identity (#13) from the files the config names: the CA certificate, the
node certificate and the node's keys, checked to belong together and to this node.

File I/O, so it lives in the agent; what it builds (crypto/trust.py's Trust) is pure.
"""

from __future__ import annotations

from meshnet.config import Config
from meshnet.crypto.certs import CertError, load_ca_cert, load_node_cert, load_node_keys
from meshnet.crypto.trust import Trust


def load_trust(config: Config, loop_now: float, wall_now: float) -> Trust:
    """The Trust for CONFIG's ca_cert, node_cert and node_key; CertError names what is wrong.
    LOOP_NOW is the event loop's clock (what membership passes as now), WALL_NOW Unix time."""
    ca = load_ca_cert(config.ca_cert)
    cert = load_node_cert(config.node_cert, ca)
    keys = load_node_keys(config.node_key)
    if cert.dp_key != keys.dp_pub:
        raise CertError(f"{config.node_cert} is for another datapath key than {config.node_key}")
    if cert.name != config.name:
        raise CertError(f"{config.node_cert} names node {cert.name}, but this node is "
                        f"{config.name} (set name, or sign a certificate for it)")
    try:
        return Trust(ca, config.name, keys, cert, loop_now, wall_offset=wall_now - loop_now)
    except CertError as e:
        raise CertError(f"{config.node_cert}: {e}") from None
