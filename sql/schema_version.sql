SELECT cdc_invalidator.schema_version()
