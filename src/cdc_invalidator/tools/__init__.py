"""The operator's tools: `keys` (which keys a row maps to), `tail` (what is being
invalidated now), `explain` (why is this key stale?). Each reads what the listener
writes or the configuration says; none takes part in invalidation."""


class UsageError(ValueError):
    """The command line asks for something the configuration cannot answer (an unknown
    table, a malformed COLUMN=VALUE): exit 2, the message naming the culprit."""
