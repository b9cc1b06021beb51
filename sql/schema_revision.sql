SELECT cdc_invalidator.schema_revision()
