from traitloc.cli.commands import main

raise SystemExit(main())
