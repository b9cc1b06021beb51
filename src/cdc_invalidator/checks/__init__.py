"""`check`: the configuration against the live database and Redis.

One module per what is checked: the configuration alone (config), the database in
either capture mode (database), each mode's own install (trigger, logical), and Redis
(redis); what they found goes into a Report (report).
"""

from cdc_invalidator.checks.config import check_templates
from cdc_invalidator.checks.database import (
    ModeChecks,
    TableFacts,
    check_all_tables,
    check_database,
    check_lineage,
    check_rebuild_guard,
    check_unconfigured,
    drifted,
    stand_in_of,
)
from cdc_invalidator.checks.logical import (
    check_leftover_slots,
    check_logical_filter,
    check_logical_server,
    check_logical_table,
    check_walks,
)
from cdc_invalidator.checks.redis import check_redis, check_slots, source_of
from cdc_invalidator.checks.report import Report
from cdc_invalidator.checks.trigger import (
    Watch,
    check_bulk_sweep_rows,
    check_notify_payload,
    check_subscribed,
    check_trigger_filter,
    check_triggers,
    check_two_phase,
    check_wake_locks,
    report_drift,
    watch_of,
)

__all__ = [
    "ModeChecks",
    "Report",
    "TableFacts",
    "Watch",
    "check_all_tables",
    "check_bulk_sweep_rows",
    "check_database",
    "check_leftover_slots",
    "check_lineage",
    "check_logical_filter",
    "check_logical_server",
    "check_logical_table",
    "check_notify_payload",
    "check_rebuild_guard",
    "check_redis",
    "check_slots",
    "check_subscribed",
    "check_templates",
    "check_trigger_filter",
    "check_triggers",
    "check_two_phase",
    "check_unconfigured",
    "check_wake_locks",
    "check_walks",
    "drifted",
    "report_drift",
    "source_of",
    "stand_in_of",
    "watch_of",
]
