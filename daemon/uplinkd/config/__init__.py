"""The configuration: its model, the two file formats (uplinkd.toml, Net-ISP-Balance's
balance.conf), their shared checks, and loading one (load, parse)."""
