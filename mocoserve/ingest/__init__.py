"""The ingest pipeline: scan -> read + decode -> model -> write."""
