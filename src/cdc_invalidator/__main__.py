from cdc_invalidator.cli import main

raise SystemExit(main())
