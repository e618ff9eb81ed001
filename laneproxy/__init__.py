"""laneproxy: a reverse proxy that routes path prefixes to lanes.

Data flow (one request, one exchange):

    client ─bytes─▶ downstream.DownstreamProtocol ─httptools─▶ router.Router.match(path) ─▶ lane.Lane
       ▲                                                                                     │ pick()
       │                                                                  pool.Pool.acquire()◀┘
       └── exchange.Exchange relays the response ◀── upstream.UpstreamProtocol (httptools) ◀── conn

    downstream pause_writing → upstream pause_reading, and the reverse (backpressure crosses sides).
"""

__version__ = "0.1.0"

