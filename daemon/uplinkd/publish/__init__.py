"""Telling the world: the publisher of link events, mail, the D-Bus adapter, the status
snapshot."""
