"""`python -m bench`: see bench/run.py and bench/NOTES.md."""
import sys

from bench.run import main

sys.exit(main())
