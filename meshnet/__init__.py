"""meshnet: a peer-to-peer mesh agent."""

__version__ = "0.1.0"
