"""nbdcache's remote-memory lab: N memory servers, a VM swapping on them, figures.

- `netns`: server hosts as network namespaces with veth links (and their removal);
- `procs`: the servers and proxies the lab starts (and their end);
- `delay`: a TCP proxy that adds latency to each request's round trip;
- `lab`: one run (servers + VM + hog) and its row of results;
- `sweep`: a grid of runs to CSV; `plot`: the CSV to PNG charts.

The VM and the servers come from the end-to-end tests' harness (`vm`, in
tests/e2e), put on the path here for every module.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests" / "e2e"))
