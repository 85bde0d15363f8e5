"""A long-lived Ray driver that runs the training stages of one `dvc repro` (started by `pipelines.local_cluster`).

A training stage run as its own process spends ~10 s before Ray Train starts: importing torch, Ray and MLflow,
connecting to the cluster, and a first `TorchTrainer.fit` in a new Ray job, which finds no idle worker process
to reuse. The default pipeline has 20+ such stages. Here one process pays that once: each stage command
(`python -m pipelines.train ...`, unchanged in dvc.yaml) sees MMROBUST_WARM_DRIVER, sends its arguments,
working directory and environment over a Unix socket, and streams back the output and exit status of the same
`main()` run here. Without the variable, or when the socket does not answer, the stage runs in its own process
as before: same code, same results (the training itself always runs in fresh Ray Train worker processes).

    python -m pipelines.warm_driver --socket PATH      # serves until SIGTERM; requests run one at a time
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socket
import struct
import sys
import threading

ENV_VAR = "MMROBUST_WARM_DRIVER"
MODULES = ("pipelines.train", "pipelines.train_vl", "pipelines.pretrain")  # entrypoints a client may run here
_HEADER = struct.Struct(">cI")  # frame: kind (o stdout, e stderr, x exit status, r request) + payload length


def _send(conn: socket.socket, kind: bytes, payload: bytes) -> None:
    conn.sendall(_HEADER.pack(kind, len(payload)) + payload)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def _recv(conn: socket.socket) -> tuple[bytes, bytes]:
    kind, size = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
    return kind, _recv_exact(conn, size)


# ------------------------------------------------------------------ client (the stage command)
def forward(module: str, argv: list[str]) -> int | None:
    """Run `python -m module argv` in the warm driver named by $MMROBUST_WARM_DRIVER and relay its output;
    the exit status, or None when there is no warm driver (the caller then runs it itself)."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError as err:
        print(f"warm driver {path} does not answer ({err}); running in this process", file=sys.stderr, flush=True)
        conn.close()
        return None
    with conn:
        request = {"module": module, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
        _send(conn, b"r", json.dumps(request).encode())
        out = {b"o": sys.stdout, b"e": sys.stderr}
        started = False
        while True:
            try:
                kind, payload = _recv(conn)
            except OSError:
                if not started:  # it died while loading: nothing of this stage ran there
                    print(f"warm driver {path} closed before starting `{module}`; running in this process",
                          file=sys.stderr, flush=True)
                    return None
                print(f"warm driver {path} went away before `{module}` finished", file=sys.stderr, flush=True)
                return 1
            started = True
            if kind == b"x":
                return int(payload)
            stream = out[kind]
            stream.write(payload.decode(errors="replace"))
            stream.flush()


# ------------------------------------------------------------------ server
class _Stop(Exception):
    """SIGTERM: stop serving."""


def _stop(*_) -> None:
    raise _Stop


class _Stream:
    """A text stream that forwards everything written to it to the client as frames of one kind."""

    encoding = "utf-8"

    def __init__(self, conn: socket.socket, kind: bytes, lock: threading.Lock):
        self.conn, self.kind, self.lock = conn, kind, lock

    def write(self, text: str) -> int:
        if text:
            with self.lock:
                _send(self.conn, self.kind, text.encode())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _watch(conn: socket.socket, finished: threading.Event) -> None:
    """A client that goes away (the stage was interrupted) aborts its run: SIGINT is what Ray Train's fit
    handles as a graceful abort, and anything else gets KeyboardInterrupt."""
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    if not finished.is_set():
        os.kill(os.getpid(), signal.SIGINT)


def handle(conn: socket.socket) -> None:
    kind, payload = _recv(conn)
    request = json.loads(payload)
    lock, finished = threading.Lock(), threading.Event()
    out, err = _Stream(conn, b"o", lock), _Stream(conn, b"e", lock)
    saved = sys.stdout, sys.stderr, sys.argv, dict(os.environ), os.getcwd()
    status = 1
    try:
        sys.stdout, sys.stderr = out, err
        if kind != b"r" or request.get("module") not in MODULES:
            print(f"warm driver: cannot run {request.get('module')!r} (only {', '.join(MODULES)})", file=err)
        else:
            threading.Thread(target=_watch, args=(conn, finished), daemon=True).start()
            os.environ.clear()
            os.environ.update(request["env"])
            os.chdir(request["cwd"])
            sys.argv = [f"python -m {request['module']}", *request["argv"]]
            print(f"(warm driver pid {os.getpid()}: python -m {request['module']} {' '.join(request['argv'])})",
                  flush=True)
            status = importlib.import_module(request["module"]).main(request["argv"]) or 0
    except SystemExit as exc:  # argparse
        status = exc.code if isinstance(exc.code, int) else 1
    except _Stop:
        raise
    except BaseException:  # the stage failed (or was aborted): report it, keep serving
        import traceback

        traceback.print_exc(file=err)
    finally:
        finished.set()
        sys.stdout, sys.stderr, sys.argv = saved[0], saved[1], saved[2]
        os.environ.clear()
        os.environ.update(saved[3])
        os.chdir(saved[4])
    try:
        _send(conn, b"x", str(status).encode())
    except OSError:
        pass


def serve(path: str) -> None:
    # Listening first: a stage that starts while this driver still loads waits in the backlog, not for a timeout.
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    try:
        from mmrobust.ray_utils import ray_session

        for module in MODULES:  # the imports a stage process would pay each time
            importlib.import_module(module)
        with ray_session(log=lambda *_: None):
            signal.signal(signal.SIGTERM, _stop)  # after ray.init, which installs its own (exit status 15)
            while True:
                conn, _ = server.accept()
                with conn:
                    handle(conn)
    except _Stop:
        pass
    finally:
        server.close()
        if os.path.exists(path):
            os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True, help="Unix socket path to serve on")
    serve(ap.parse_args(argv).socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
