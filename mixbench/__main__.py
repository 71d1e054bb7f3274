from mixbench.cli import main

raise SystemExit(main())
