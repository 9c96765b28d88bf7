"""Heartbeat benchmark: the real node agent against N simulated guests in another process."""
