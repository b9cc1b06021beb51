SELECT cdc_invalidator.ensure_replica_identity({table}, {columns});
