"""Thin Prefect tasks over vlmforge's core functions: retries, logging and artifacts live here, the work does not."""
