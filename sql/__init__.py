"""The SQL a DBA reviews. This folder doubles as the package cdc_invalidator.sql so that
the same files ship inside the wheel (read with importlib.resources)."""
