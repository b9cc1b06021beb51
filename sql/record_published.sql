SELECT cdc_invalidator.record_published({table}, {schema}, {name}, {columns}, {keep}, {publication});
