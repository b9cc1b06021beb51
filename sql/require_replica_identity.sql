SELECT cdc_invalidator.require_replica_identity({table});
