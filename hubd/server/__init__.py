"""The daemon: an aiohttp application around one Engine, on a Unix socket and optional loopback TCP."""
