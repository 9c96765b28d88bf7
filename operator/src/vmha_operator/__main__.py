"""`python -m vmha_operator` is `vmha-operator`."""

from vmha_operator.cli import main

raise SystemExit(main())
