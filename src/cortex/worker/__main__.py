import sys

from cortex.worker import runtime

sys.exit(runtime.main())
