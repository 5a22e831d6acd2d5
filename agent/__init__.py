"""hs-gossip: a gossip swarm agent for edge devices."""

__version__ = "0.1.0"
