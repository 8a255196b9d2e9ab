"""Watching each link: its state machine, the ICMP and hop probes that feed it, kernel events
(netlink), probe target names, and traffic rates."""
