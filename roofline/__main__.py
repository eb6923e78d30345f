"""`python -m roofline`: the command line of `roofline.cli`."""

import sys

from roofline.cli import _request_host_devices, main

if __name__ == "__main__":
    _request_host_devices(sys.argv[1:])
    sys.exit(main())
