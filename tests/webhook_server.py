"""A webhook receiver for the notification tests, run as a child process.

    python webhook_server.py LOG PORT_FILE [FAIL_FIRST [drip]]

Listens on 127.0.0.1 (a free port, written to PORT_FILE once it listens), answers
every POST with 500 for the first FAIL_FIRST requests and 200 after, and appends one
JSON line per request to LOG *before* answering: ``{"n", "status", "key",
"content_type", "path", "event"}``. So every request the deliverer sent, and what it
was told, is on record.

With ``drip``, it answers one byte per second, for ever (a status line padded with
spaces): a subscriber that is alive but never finishes answering.
"""

from __future__ import annotations

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

LOG, PORT_FILE = sys.argv[1], sys.argv[2]
FAIL_FIRST = int(sys.argv[3]) if len(sys.argv) > 3 else 0
DRIP = len(sys.argv) > 4 and sys.argv[4] == "drip"


class Handler(BaseHTTPRequestHandler):
    seen = 0  # requests so far (the server is single-threaded)

    def do_POST(self) -> None:
        Handler.seen += 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = 500 if Handler.seen <= FAIL_FIRST else 200
        record = {"n": Handler.seen, "status": status, "key": self.headers.get("Idempotency-Key"),
                  "content_type": self.headers.get("Content-Type"), "path": self.path,
                  "event": json.loads(body)}
        with open(LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
        if DRIP:
            for byte in b"HTTP/1.1 200 OK" + b" " * 100_000:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(1)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:  # quiet: the LOG file is the record
        pass


server = HTTPServer(("127.0.0.1", 0), Handler)
with open(PORT_FILE + ".tmp", "w", encoding="utf-8") as fh:
    fh.write(str(server.server_address[1]))
os.replace(PORT_FILE + ".tmp", PORT_FILE)
server.serve_forever()
