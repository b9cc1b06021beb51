-- Trigger mode, at each connect: this server's lineage noted, and a sweep of every watched
-- table queued if it is another than the one the listener last ran on, or than the one
-- its previous session saw (note_server_v1() in schema.sql says why).
SELECT previous, current, swept FROM cdc_invalidator.note_server_v1(%(sweep)s, %(seen)s)
