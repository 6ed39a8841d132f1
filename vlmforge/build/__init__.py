"""One build end to end, without Prefect: fingerprinted stages, work dir, manifest, publish, watch."""
