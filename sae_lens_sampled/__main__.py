import sys

from sae_lens_sampled.cli import main

sys.exit(main())
