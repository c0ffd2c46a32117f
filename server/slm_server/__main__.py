from slm_server.cli import main

raise SystemExit(main())
