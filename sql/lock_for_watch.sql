-- Before the watch() calls: the tables whose triggers they will make or alter, locked
-- here all at once, their waits bounded all together (schema.sql, lock_for_watch_v1()).
SELECT cdc_invalidator.lock_for_watch_v1(ARRAY[{tables}]::regclass[]);
