from unlearn_jax.apps.cli import main

raise SystemExit(main())
