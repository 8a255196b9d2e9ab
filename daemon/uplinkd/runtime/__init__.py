"""The running daemon: its assembly, the coordinator that turns events into applies, the
measurements, fastest-response's races, one instance per namespace."""
