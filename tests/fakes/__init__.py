"""Stand-ins for unit tests: a backend that keeps its state in memory, a bus controller."""
