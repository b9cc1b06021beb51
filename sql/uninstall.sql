-- cdc-invalidator: remove every object the install created, in one transaction:
-- our triggers and trigger functions on watched tables (leave_trigger.sql, before this),
-- then the schema with the queue, dead letters and listener state. Events still queued
-- are dropped with the queue: let the listener drain it first (`cdc-invalidator status`
-- shows the backlog). Running it when nothing is installed does nothing.
DROP SCHEMA IF EXISTS cdc_invalidator CASCADE;
