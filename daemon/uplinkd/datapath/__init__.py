"""Bringing the kernel to a Plan in one apply: the netfilter backends (nftables, iptables),
policy routing, conntrack, and the libnftables and NFLOG bindings."""
