"""Runners: load an engine directory and generate (the same code validates builds and serves deployments)."""
