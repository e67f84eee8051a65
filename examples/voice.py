#!/usr/bin/env python3
"""A small voice handler for Sautikit, with nothing but Python's standard library.

    python3 examples/voice.py            # listens on 127.0.0.1:3000 (PORT=… to change)

Route a number to it (voice_callback_url http://127.0.0.1:3000/voice, events_url
http://127.0.0.1:3000/events) and call the number: it greets the caller, asks for a key, says
the key back and hangs up. Each request's form fields and each event are printed; with
WEBHOOK_SECRET set (the dev workspace's is in sautikit-data/dev-credentials.json), signatures
are checked and a request with a bad one is refused.
"""

import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

SECRET = os.environ.get("WEBHOOK_SECRET", "")


def signed(headers, body):
    """X-Sautikit-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of body + "." + t>."""
    if not SECRET:
        return True
    parts = dict(p.split("=", 1) for p in headers.get("X-Sautikit-Signature", "").split(",") if "=" in p)
    t, v1 = parts.get("t", ""), parts.get("v1", "")
    if not t.isdigit() or abs(time.time() - int(t)) > 300:
        return False
    expected = hmac.new(SECRET.encode(), body + b"." + t.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(v1, expected)


def script(path, form):
    """The VoiceAction reply for a request to `path` with these form fields."""
    if path == "/voice":
        return {"actions": [
            {"say": {"text": "Hello, thank you for calling.", "voice": "alice"}},
            {"getDigits": {"numDigits": 1, "timeout": 5, "action": "/key",
                           "nested": [{"say": {"text": "Press any key."}}]}},
            {"say": {"text": "We did not get a key. Goodbye."}},
            {"hangup": {}},
        ]}
    if path == "/key":
        key = form.get("Digits", "")
        return {"actions": [
            {"say": {"text": f"You pressed {key}. Goodbye."}},
            {"hangup": {}},
        ]}
    return None


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not signed(self.headers, body):
            self.reply(401, {"error": "bad signature"})
            return
        if self.path == "/events":
            event = json.loads(body or b"{}")
            payload = event.get("payload", {})
            print(f"event {event.get('event_kind')} {payload.get('call_id')} {payload.get('status')}", flush=True)
            self.reply(200, {"ok": True})
            return
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        print(f"{self.path} {form.get('CallStatus', '')} {json.dumps(form)}", flush=True)
        reply = script(self.path, form)
        self.reply(200 if reply else 404, reply or {"error": "no such path"})

    def do_GET(self):
        self.reply(200, {"ok": True})

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "3000"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"voice handler on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    server.serve_forever()
