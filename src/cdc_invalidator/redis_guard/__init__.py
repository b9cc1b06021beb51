"""After Redis comes back as another server (a restart from its files, a failover): what
it may have brought back, and deleting it again."""
