from agent.face.cli import main

raise SystemExit(main())
