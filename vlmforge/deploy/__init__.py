"""Deploying runners from the store: build selection, launchers (process, container), records."""
