"""A stand-in microVM application for the emulator's MicroVM tests.

Serves the lifecycle hooks on MVM_SHARD_BIND_IP:MVM_SHARD_HOOKS_PORT and, on
MVM_SHARD_BIND_IP:MVM_SHARD_LOG_PORT:

- GET|POST /echo: the request as JSON (method, path, headers, body) with the
  run hook's body and this process's pid
- GET /stream: "first" at once, "second" after GET /release (or 30 s)

It records into RECORD_DIR (the first argument), as files named after its
bind address: IP.pid (its pid and that of a detached child it starts, to
prove the whole tree dies), IP.run (the run hook's body) and IP.terminate
(when the terminate hook was called).
"""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

record_dir = sys.argv[1]
bind_ip = os.environ["MVM_SHARD_BIND_IP"]
hooks_port = int(os.environ["MVM_SHARD_HOOKS_PORT"])
app_port = int(os.environ["MVM_SHARD_LOG_PORT"])
state = {"run": None, "ready_calls": 0}
released = threading.Event()


def record(suffix, data):
    path = os.path.join(record_dir, f"{bind_ip}.{suffix}")
    with open(path + ".tmp", "w") as f:
        f.write(data)
    os.rename(path + ".tmp", path)


class Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def answer(self, status, payload=b""):
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class Hooks(Quiet):
    def do_POST(self):
        hook = self.path.rsplit("/", 1)[-1]
        body = self.body()
        if hook == "ready":
            # Not ready at the first probe, so that the emulator must poll.
            state["ready_calls"] += 1
            self.answer(200 if state["ready_calls"] > 1 else 503)
        elif hook == "run":
            if state["run"] is not None:
                self.answer(409)
                return
            state["run"] = body.decode()
            record("run", state["run"])
            self.answer(200)
        elif hook == "terminate":
            record("terminate", "called")
            self.answer(200)
        else:
            self.answer(200)


class App(Quiet):
    def echo(self):
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers.items()),
                "body": self.body().decode(),
                "run": state["run"],
                "pid": os.getpid(),
            }
        ).encode()
        self.answer(200, payload)

    def do_POST(self):
        self.echo()

    def do_GET(self):
        if self.path == "/stream":
            # HTTP/1.0 without a length: the body ends when the connection does.
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"first\n")
            self.wfile.flush()
            released.wait(30)
            self.wfile.write(b"second\n")
        elif self.path == "/release":
            released.set()
            self.answer(200)
        else:
            self.echo()


child = subprocess.Popen(["sleep", "300"], start_new_session=True)
hooks = ThreadingHTTPServer((bind_ip, hooks_port), Hooks)
app = ThreadingHTTPServer((bind_ip, app_port), App)
record("pid", json.dumps({"pid": os.getpid(), "child": child.pid}))
threading.Thread(target=app.serve_forever, daemon=True).start()
hooks.serve_forever()
