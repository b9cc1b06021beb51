-- What is past replay_history cannot be replayed any more.
DELETE FROM cdc_invalidator.history_v1 WHERE at < now() - make_interval(secs => %(seconds)s)
