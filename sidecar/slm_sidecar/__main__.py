from slm_sidecar.cli import main

raise SystemExit(main())
