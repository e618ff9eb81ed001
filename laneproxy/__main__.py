from laneproxy.cli import main

raise SystemExit(main())
