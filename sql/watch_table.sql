SELECT cdc_invalidator.watch({table}, {columns}{column_filter}{payload}{bulk});
