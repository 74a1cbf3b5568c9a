import sys

from r2m_ext.cli import main

sys.exit(main())
