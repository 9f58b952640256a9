from pipeline.bench.run import main

raise SystemExit(main())
