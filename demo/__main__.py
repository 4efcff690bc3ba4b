"""`python -m gradmix.demo`: run the built-in demonstration (see `gradmix.demo.job`)."""

from gradmix.demo.job import main

raise SystemExit(main())
