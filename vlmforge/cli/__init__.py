"""Command-line interface of vlmforge."""
