from bench.faultzoo.runner import main

raise SystemExit(main())
