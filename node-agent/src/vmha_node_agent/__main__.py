import sys

from vmha_node_agent.cli import main

sys.exit(main())
