"""uplinkd: multi-WAN load balancing and failover for Linux routers and hosts."""

__version__ = "0.1.0"
