"""The pure part: a Plan from the configuration, the links' facts and states, and the measured
methods' choices; no I/O."""
