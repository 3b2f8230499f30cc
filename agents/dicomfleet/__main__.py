from dicomfleet.cli import main

raise SystemExit(main())
