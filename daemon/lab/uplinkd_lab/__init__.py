"""The namespace lab (a LAN client, a router, N ISPs and an Internet host, in network
namespaces) and the demo that runs uplinkd in it. The daemon never imports it."""
