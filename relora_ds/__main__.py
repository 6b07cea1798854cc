import sys

from relora_ds.cli import main

sys.exit(main())
