#!/usr/bin/env python3
"""Real-client check with the Python `kubernetes` client (kube-relay integration tests).

Runs, against one kubeconfig context (normally pointing at the relay), in order:

1. list-pods         list pods in the namespace; expects the named pod (web-0).
2. watch-pods        watch pods with a small server-side timeout; stops at the first ADDED event.
3. exec-echo         `echo hello` over WebSocket with the client's own subprotocol offer
                     (v5.channel.k8s.io, v4.channel.k8s.io in recent clients); expects "hello".
4. exec-echo-v4      the same, offering only v4.channel.k8s.io (what older clients send).
5. exec-cat          interactive `cat`: writes to stdin, reads the same bytes back from stdout; on
                     v5 also half-closes stdin and expects cat to exit 0.
6. port-forward      port-forward to port 8080 (`ports='8080'`); sends bytes on the forwarded
                     socket and expects them echoed back (the simulator echoes on every port).

Prints one line per check ("ok   name: detail"), stops at the first failure with
"FAIL name: reason" and exit status 1 (2 for bad usage). Every wait is bounded: each check has its
own timeout and a hard deadline (SIGALRM) covers the whole run.
"""

import argparse
import signal
import socket
import sys
import time

import websocket  # websocket-client: the transport the kubernetes client uses for exec / port-forward
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward, stream


class CheckFailed(Exception):
    """A check did not get what it expected; the message says what happened."""


class DeadlineExceeded(BaseException):
    """Raised from the SIGALRM handler. A BaseException so library `except Exception` blocks
    (the kubernetes client wraps WebSocket errors that way) cannot swallow it."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True, help="kubeconfig file")
    parser.add_argument("--context", required=True, help="context to use")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--pod", default="web-0", help="pod expected in the list and used for exec")
    parser.add_argument("--container", default=None, help="container (default: the pod's only one)")
    parser.add_argument("--port", type=int, default=8080, help="pod port to forward")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds allowed per check")
    parser.add_argument("--deadline", type=int, default=120, help="seconds allowed for the whole run")
    args = parser.parse_args(argv)
    if args.timeout <= 0 or args.deadline <= 0:
        parser.error("--timeout and --deadline must be positive")
    return args


def describe(error):
    """One line for an exception, with the API status and body when there is one."""
    if isinstance(error, ApiException):
        body = (error.body or "").strip().replace("\n", " ")
        if len(body) > 300:
            body = body[:300] + "..."
        return f"API error status={error.status} reason={error.reason} body={body}"
    return f"{type(error).__name__}: {error}"


def exec_kwargs(args):
    kwargs = {}
    if args.container:
        kwargs["container"] = args.container
    return kwargs


def check_list_pods(core, args):
    pods = core.list_namespaced_pod(args.namespace, _request_timeout=args.timeout)
    names = [pod.metadata.name for pod in pods.items]
    if args.pod not in names:
        raise CheckFailed(f"pod {args.pod} not in namespace {args.namespace}: got {names}")
    return f"{len(names)} pods in {args.namespace}, including {args.pod}"


def check_watch_pods(core, args):
    # timeout_seconds bounds the server side (and disables the client's silent retries);
    # _request_timeout bounds the socket reads if the server ignores it.
    watcher = watch.Watch()
    server_timeout = max(1, min(5, int(args.timeout)))
    try:
        for event in watcher.stream(
            core.list_namespaced_pod,
            args.namespace,
            timeout_seconds=server_timeout,
            _request_timeout=args.timeout,
        ):
            if event["type"] == "ADDED":
                name = event["object"].metadata.name
                return f"first event ADDED {name}"
            raise CheckFailed(f"first event was {event['type']}, expected ADDED")
    finally:
        watcher.stop()
    raise CheckFailed(f"watch ended after {server_timeout}s without any event")


def check_exec_echo(core, args, force_v4):
    kwargs = exec_kwargs(args)
    if force_v4:
        # Overrides the client's default offer ("v5.channel.k8s.io,v4.channel.k8s.io").
        kwargs["_headers"] = {"sec-websocket-protocol": "v4.channel.k8s.io"}
    # With _preload_content left True the client runs the socket until it closes or
    # _request_timeout passes, and returns stdout and stderr combined.
    output = stream(
        core.connect_get_namespaced_pod_exec,
        args.pod,
        args.namespace,
        command=["echo", "hello"],
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
        _request_timeout=args.timeout,
        **kwargs,
    )
    if output.strip() != "hello":
        raise CheckFailed(f"output {output!r}, expected 'hello\\n'")
    return "output 'hello'"


def check_exec_cat(core, args):
    resp = stream(
        core.connect_get_namespaced_pod_exec,
        args.pod,
        args.namespace,
        command=["cat"],
        stderr=True,
        stdin=True,
        stdout=True,
        tty=False,
        _preload_content=False,
        **exec_kwargs(args),
    )
    try:
        protocol = resp.subprotocol or "none"
        if not resp.is_open():
            raise CheckFailed("the exec WebSocket closed right after the handshake")
        payload = f"kube-relay-check {time.time_ns()}\n"
        resp.write_stdin(payload)
        echoed = ""
        stderr = ""
        deadline = time.monotonic() + args.timeout
        while payload not in echoed and resp.is_open() and time.monotonic() < deadline:
            resp.update(timeout=0.5)
            echoed += resp.read_stdout(timeout=0)
            stderr += resp.read_stderr(timeout=0)
        if payload not in echoed:
            state = "open" if resp.is_open() else "closed"
            raise CheckFailed(
                f"stdin not echoed within {args.timeout}s (socket {state}, subprotocol {protocol}): "
                f"stdout {echoed!r}, stderr {stderr!r}"
            )
        if protocol != "v5.channel.k8s.io":
            # v4 has no half-close: ending stdin means closing the socket.
            return f"echoed {len(payload)} bytes (subprotocol {protocol}; no stdin half-close in v4)"
        # v5: half-close stdin; cat sees EOF and exits, and the error channel says Success.
        resp.close_channel(0)
        resp.run_forever(timeout=args.timeout)
        if resp.is_open():
            raise CheckFailed(f"cat did not exit within {args.timeout}s after stdin was closed (v5 CLOSE)")
        try:
            code = resp.returncode
        except Exception as error:  # the error channel was empty or not a Status
            raise CheckFailed(f"no exit status after cat ended: {describe(error)}") from error
        if code != 0:
            raise CheckFailed(f"cat exited with {code}")
        return f"echoed {len(payload)} bytes, stdin half-closed, exit 0 (subprotocol {protocol})"
    finally:
        resp.close()


def check_port_forward(core, args):
    pf = portforward(
        core.connect_get_namespaced_pod_portforward,
        args.pod,
        args.namespace,
        ports=str(args.port),
    )
    try:
        sock = pf.socket(args.port)
        sock.settimeout(args.timeout)
        payload = f"kube-relay port-forward check {time.time_ns()}\n".encode()
        sock.sendall(payload)
        received = b""
        deadline = time.monotonic() + args.timeout
        while len(received) < len(payload) and time.monotonic() < deadline:
            try:
                chunk = sock.recv(len(payload) - len(received))
            except socket.timeout:
                break
            if not chunk:
                break
            received += chunk
        if received != payload:
            error = pf.error(args.port)
            raise CheckFailed(
                f"sent {payload!r}, got back {received!r}" + (f"; port error {error!r}" if error else "")
            )
        sock.close()
        return f"{len(payload)} bytes echoed through port {args.port}"
    finally:
        pf.close()


def main(argv):
    args = parse_args(argv)

    def on_alarm(_signum, _frame):
        raise DeadlineExceeded(f"the run did not finish within {args.deadline}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.deadline)
    # websocket-client sockets get no timeout from the kubernetes client: bound the connect and
    # handshake (and any blocking read) so a silent server fails the check instead of hanging it.
    websocket.setdefaulttimeout(args.timeout)

    try:
        api_client = config.new_client_from_config(config_file=args.kubeconfig, context=args.context)
    except (Exception, DeadlineExceeded) as error:
        print(f"FAIL kubeconfig: {describe(error)}", flush=True)
        return 1
    core = client.CoreV1Api(api_client)

    checks = [
        ("list-pods", lambda: check_list_pods(core, args)),
        ("watch-pods", lambda: check_watch_pods(core, args)),
        ("exec-echo", lambda: check_exec_echo(core, args, force_v4=False)),
        ("exec-echo-v4", lambda: check_exec_echo(core, args, force_v4=True)),
        ("exec-cat", lambda: check_exec_cat(core, args)),
        ("port-forward", lambda: check_port_forward(core, args)),
    ]
    for name, run in checks:
        try:
            detail = run()
        except (CheckFailed, DeadlineExceeded) as error:
            print(f"FAIL {name}: {error}", flush=True)
            return 1
        except Exception as error:
            print(f"FAIL {name}: {describe(error)}", flush=True)
            return 1
        print(f"ok   {name}: {detail}", flush=True)
    signal.alarm(0)
    print("all python client checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
