from tokenmill.launch.cli import main

raise SystemExit(main())
