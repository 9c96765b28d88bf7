"""`python3 -m vmha_guest run ...`, the same as the `vmha-guest` command."""

from vmha_guest.cli import main

raise SystemExit(main())
