from pyworker.cli import main

raise SystemExit(main())
