from hubd.cli import main

raise SystemExit(main())
