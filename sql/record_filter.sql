-- A table's column filter (its UPDATEs are judged by the listener, from the whole old
-- row): its listed columns must exist, its identity must send the whole old row (the DDL
-- guard keeps it so), and the guard is told.
SELECT cdc_invalidator.record_filter({table}, {judge}, {columns}, {keep});
