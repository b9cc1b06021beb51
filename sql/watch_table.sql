SELECT cdc_invalidator.watch({table}, {columns});
