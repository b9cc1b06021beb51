"""cdc-invalidator: delete the Redis keys that cache a PostgreSQL row when the row changes."""

__version__ = "0.1.0"
