#!/bin/sh
# Stage-2 init, run by stage 1 on the real root as PID 1. One exec: the
# rest of the setup happens inside Python (guest/sysinit.py), because
# every fork+exec costs ~40 ms under TCG.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONPATH=/run/gondolin/py PYTHONDONTWRITEBYTECODE=1
exec python3 -s -m pytest_gondolin.guest.sysinit --device /dev/virtio-ports/org.gondolin.agent
