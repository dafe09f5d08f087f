from unlearn_jax.cli import main

raise SystemExit(main())
