"""Prefect flows: build, watch, deploy, gc."""
