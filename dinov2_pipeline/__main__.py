from dinov2_pipeline.cli import main

raise SystemExit(main())
