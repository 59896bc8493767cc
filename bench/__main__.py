import sys

from bench.run import _kill_all, main

try:
    sys.exit(main())
except KeyboardInterrupt:
    _kill_all()
    print("interrupted; every process this run started has been stopped", file=sys.stderr)
    sys.exit(130)
