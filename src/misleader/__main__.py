from misleader.cli import main

raise SystemExit(main())
