import sys

from .product.cli import main

sys.exit(main())
