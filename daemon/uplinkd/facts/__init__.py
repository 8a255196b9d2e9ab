"""What each link is right now (device, address, gateway): from the kernel, from NetworkManager,
one path for `-d`, `--once` and the daemon."""
