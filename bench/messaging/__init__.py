"""Server group messaging benchmark: two real node agents, the real apiserver, simulated guests."""
