-- Whether the configured table carries the rebuild guard's stand-in (it took a watched
-- table's name after install: sql/rebuild_guard.sql), firing.
SELECT EXISTS (SELECT FROM pg_trigger
               WHERE tgrelid = to_regclass(%(table)s)
                 AND tgname = 'cdc_invalidator_stand_in_v1' AND tgenabled <> 'D') AS stand_in
