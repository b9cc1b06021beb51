SELECT cdc_invalidator.watch({table}, {columns}, {judge}, {filter_columns});
