"""Runtime subcommands: ``warmup``, ``verify``, and the edge→server link over TCP or (mutual) TLS:
``serve`` and ``send``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from splitbits.runtime.cli import (
    EXIT_REFUSED,
    CliError,
    Command,
    add_backend_arguments,
    add_input_arguments,
    backend_options,
    coder_name,
    existing_file,
    nonneg_float,
    output_file,
    port_number,
    positive_float,
    positive_int,
)


def add_warmup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", nargs="?", help="also load and run this bundle once")
    add_backend_arguments(p)
    p.add_argument("--coder", type=coder_name, default=None, help="coder to warm (default: all available)")


def run_warmup(args: argparse.Namespace) -> int:
    from splitbits.runtime.codec import CODERS, get_coder

    report = {}
    for name in [args.coder] if args.coder else list(CODERS):
        t = time.perf_counter()
        try:
            get_coder(name).warmup()
        except ImportError as exc:
            report[name] = f"unavailable: {exc}"
            continue
        report[name] = f"{(time.perf_counter() - t) * 1e3:.0f} ms"
        cache_info = getattr(get_coder(name), "cache_info", None)
        if cache_info is not None:  # the numba coder: JIT cache on disk (misses = compiled now)
            report[f"{name}_jit_cache"] = cache_info()
    if args.bundle:
        import numpy as np

        from splitbits.runtime.pipeline import EdgeEncoder, ServerDecoder

        t = time.perf_counter()
        enc = EdgeEncoder(args.bundle, args.backend, coder=args.coder, **backend_options(args))
        dec = ServerDecoder(args.bundle, args.backend, **backend_options(args))
        enc.warmup()
        dec.decode(enc.encode(np.zeros(enc.bundle.input_shape, "float32")))
        report["bundle"] = f"{(time.perf_counter() - t) * 1e3:.0f} ms"
    print(json.dumps(report, indent=2))
    return 0


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    add_backend_arguments(p, default="onnxruntime")
    p.add_argument("--coder", type=coder_name, default=None, help="coder for the end-to-end check")
    p.add_argument("--json", type=output_file, metavar="FILE", help="write the report as JSON")


def run_verify(args: argparse.Namespace) -> int:
    from splitbits.runtime.report import write_json
    from splitbits.runtime.verify import verify_backend

    rep = verify_backend(args.bundle, args.backend, coder=args.coder, **backend_options(args))
    print(json.dumps(rep.to_dict(), indent=2))
    if args.json:
        write_json(args.json, rep.to_dict())
    return 0 if rep.ok else 1


SERVE_DESCRIPTION = """\
Run the server half of the split: an asyncio TCP server that takes length-prefixed packets,
entropy-decodes them, runs the tail with dynamic batching across clients and answers each
request with its class and server timings. Bad packets get a per-request error while other
requests keep being served. Stops cleanly on Ctrl-C / SIGTERM (requests in flight are answered)
and prints its statistics as JSON.

Before listening it verifies the backend against the bundle's golden/ (as `splitbits bench`
does): a bundle that fails is refused, exit status 3.

Idle or slow peers cannot hold the connection slots: a frame must be complete within
--frame-timeout-s of its first byte, a connection with nothing started or in flight for
--idle-timeout-s is closed, and a connection over --max-connections is refused; each gets an
error saying why before it is closed.

Plain TCP serves anyone who reaches the port. With --tls-cert/--tls-key the link is TLS (1.2 at
least, 1.3 preferred); add --tls-client-ca to serve only devices whose certificate that CA signed
(mutual TLS). A failed handshake is counted and closes that connection only.

  splitbits serve runs/demo/bundle --host 0.0.0.0 --port 5800 --max-batch 16 --max-wait-ms 2
  splitbits serve runs/demo/bundle --host 0.0.0.0 --tls-cert server.pem --tls-key server.key \\
      --tls-client-ca devices-ca.pem

--ray serves the same decode + hyper + tail as a Ray Serve deployment (pip install
'splitbits[cluster]'): --replicas processes, each batching requests with @serve.batch (--max-batch,
--max-wait-ms), behind Ray Serve's HTTP proxy at http://HOST:PORT/ (a POST per packet; `splitbits
send --server http://HOST:PORT` speaks it). A bad packet gets the same JSON error (HTTP 400) and
never takes a replica down; a replica takes at most 64 requests at once. The TCP server's bounds
(--queue-size, --max-inflight, --max-connections, --decode-threads, the deadlines) do not apply.
Ray runs in this process, or joins the cluster at --ray-address. It is for many devices and more
than one machine; the asyncio TCP server above stays the light default for one machine and for
the Jetson-side loopback (no TLS and no connection deadlines on --ray: put it behind the
cluster's own ingress).

  splitbits serve runs/demo/bundle --ray --replicas 4 --host 0.0.0.0 --port 8000
"""

SEND_DESCRIPTION = """\
The edge client: encode images here (head + entropy coder), send the packets to a
`splitbits serve` server and report per-stage latency, bytes, round trip and accuracy.
--link-mbps paces the bytes through a token bucket so the numbers show what a 1, 10 or
100 Mbit/s link adds; the JSON also gives the modelled transmit time at 1/10/100 Mbit/s
for the measured packet sizes (so an attack's extra bytes read directly as extra time), and
under "wire" the bytes measured at the TCP socket per request (TLS records included) with the
TLS version, cipher and handshake time.

--server http://HOST:PORT sends to `splitbits serve --ray` (Ray Serve) instead: one HTTP POST per
packet, each request in flight on its own keep-alive connection, the same pacing and JSON (the
wire bytes then include the HTTP headers).

--tls-ca makes the link TLS (the server's certificate must be signed by that CA and name the
host, or --tls-server-name); --tls-cert/--tls-key present this device's certificate to a server
that requires one. A server that refuses the connection (busy, TLS certificate not enrolled)
is reported in one line, exit status 2.

  splitbits send runs/demo/bundle --server 192.168.1.10:5800 --dataset builtin --limit 200 \\
      --link-mbps 10 --json results/send-clean.json
  splitbits send runs/demo/bundle --server 192.168.1.10:5800 --attack corruption:shot_noise:3 \\
      --link-mbps 10 --json results/send-shot3.json
  splitbits send runs/demo/bundle --server server.lan:5800 --tls-ca ca.pem --tls-cert device.pem \\
      --tls-key device.key --json results/send-tls.json
"""


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    p.add_argument("--port", type=port_number, default=5800, help="TCP port (0 picks a free one)")
    add_backend_arguments(p)
    p.add_argument("--max-batch", type=positive_int, default=8, help="largest tail batch")
    p.add_argument("--max-wait-ms", type=nonneg_float, default=2.0, help="how long a batch waits for more requests")
    p.add_argument("--queue-size", type=positive_int, default=64, help="decoded latents waiting for the tail (bound)")
    p.add_argument("--max-inflight", type=positive_int, default=32, help="unanswered requests per connection (bound)")
    p.add_argument("--max-connections", type=positive_int, default=256, help="concurrent connections (bound)")
    p.add_argument("--decode-threads", type=positive_int, default=1, help="threads that parse and entropy-decode")
    p.add_argument("--stats-json", type=output_file, metavar="FILE", help="write the server statistics here on exit")
    g = p.add_argument_group("deadlines")
    g.add_argument("--frame-timeout-s", type=positive_float, default=10.0,
                   help="a frame must be complete this long after its first byte (also bounds a TLS handshake "
                        "and writing an answer)")
    g.add_argument("--idle-timeout-s", type=positive_float, default=60.0,
                   help="close a connection with no frame started and nothing in flight for this long")
    r = p.add_argument_group("Ray Serve (the cluster extra)")
    r.add_argument("--ray", action="store_true", help="serve over HTTP as a Ray Serve deployment with replicas")
    r.add_argument("--replicas", type=positive_int, default=2, help="--ray: replicas of the deployment")
    r.add_argument("--replica-cpus", type=positive_float, default=1.0, help="--ray: CPUs each replica takes")
    r.add_argument("--replica-gpus", type=nonneg_float, default=0.0, help="--ray: GPUs each replica takes")
    r.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="--ray: join this Ray cluster (auto, HOST:6379) instead of starting Ray in this process")
    t = p.add_argument_group("TLS (default: plain TCP, anyone who reaches the port is served)")
    t.add_argument("--tls-cert", type=existing_file, metavar="CERT.pem",
                   help="server certificate chain (PEM): serve TLS")
    t.add_argument("--tls-key", type=existing_file, metavar="KEY.pem",
                   help="its private key (PEM, unencrypted; default: in CERT.pem)")
    t.add_argument("--tls-client-ca", type=existing_file, metavar="CA.pem",
                   help="serve only clients with a certificate signed by this CA (mutual TLS)")


def _ray_serve(args: argparse.Namespace) -> int:
    """``serve --ray``: the deployment of ``splitbits.cluster.serve`` (found by entry point)."""
    from splitbits.runtime.cli import extension
    from splitbits.runtime.errors import VerificationError
    from splitbits.runtime.report import write_json

    if args.tls_cert or args.tls_key or args.tls_client_ca:
        raise CliError("--ray serves plain HTTP; TLS is the TCP server's (or the cluster ingress's)")
    serve_ray = extension("serve.ray", "cluster")
    try:
        out = serve_ray(args.bundle, args.backend, backend_options(args), host=args.host, port=args.port,
                        replicas=args.replicas, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                        replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus, address=args.ray_address,
                        ready=lambda url: print(f"listening on {url} (Ray Serve, {args.replicas} replicas)",
                                                flush=True))
    except VerificationError as exc:
        print(f"splitbits serve: REFUSED (not serving) — {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print(json.dumps(out, indent=2), flush=True)
    if args.stats_json:
        write_json(args.stats_json, out)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    if args.ray:
        return _ray_serve(args)

    from splitbits.runtime.errors import VerificationError
    from splitbits.runtime.link import server_tls_context
    from splitbits.runtime.report import write_json
    from splitbits.runtime.server import ServerConfig, run_server

    tls = None
    if args.tls_cert:
        tls = server_tls_context(args.tls_cert, args.tls_key, args.tls_client_ca)
    elif args.tls_key or args.tls_client_ca:
        raise CliError("--tls-key/--tls-client-ca need --tls-cert (the server's certificate)")
    try:
        config = ServerConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                              queue_size=args.queue_size, max_inflight=args.max_inflight,
                              max_connections=args.max_connections, decode_threads=args.decode_threads,
                              frame_timeout_s=args.frame_timeout_s, idle_timeout_s=args.idle_timeout_s, tls=tls)
    except ValueError as exc:
        raise CliError(str(exc)) from exc

    def ready(addr: tuple[str, int]) -> None:
        mode = ("mutual TLS" if args.tls_client_ca else "TLS, no client certificates") if tls else "plain TCP"
        print(f"listening on {addr[0]}:{addr[1]} ({mode})", flush=True)
        if not args.tls_client_ca and addr[0] not in ("127.0.0.1", "::1", "localhost"):
            print(f"splitbits serve: warning: {addr[0]}:{addr[1]} serves anyone who reaches it; "
                  "use --tls-cert/--tls-key/--tls-client-ca to serve enrolled devices only",
                  file=sys.stderr, flush=True)

    try:
        stats = asyncio.run(run_server(args.bundle, args.backend, config, ready=ready, **backend_options(args)))
    except VerificationError as exc:
        print(f"splitbits serve: REFUSED (not serving) — {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    out = stats.to_dict()
    print(json.dumps(out, indent=2), flush=True)
    if args.stats_json:
        write_json(args.stats_json, out)
    return 0


def add_send_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory (the same model as the server's)")
    p.add_argument("--server", required=True,
                   help="HOST:PORT of a `splitbits serve`, or http://HOST:PORT of a `splitbits serve --ray`")
    add_backend_arguments(p)
    p.add_argument("--coder", type=coder_name, default=None, help="entropy coder (default: the runtime's default)")
    add_input_arguments(p.add_argument_group("inputs"))
    g = p.add_argument_group("link")
    g.add_argument("--link-mbps", type=positive_float, default=None, help="pace the bytes at this rate (token bucket)")
    g.add_argument("--concurrency", type=positive_int, default=1, help="requests in flight per connection")
    g.add_argument("--connections", type=positive_int, default=1, help="parallel connections")
    t = p.add_argument_group("TLS (default: plain TCP)")
    t.add_argument("--tls-ca", type=existing_file, metavar="CA.pem",
                   help="use TLS; trust only this CA for the server's certificate")
    t.add_argument("--tls-cert", type=existing_file, metavar="CERT.pem",
                   help="this device's certificate (for a mutual-TLS server)")
    t.add_argument("--tls-key", type=existing_file, metavar="KEY.pem",
                   help="its private key (PEM, unencrypted; default: in CERT.pem)")
    t.add_argument("--tls-server-name", metavar="NAME",
                   help="name the server's certificate must carry (default: the host of --server)")
    p.add_argument("--json", type=output_file, metavar="FILE", help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_send(args: argparse.Namespace) -> int:
    import asyncio

    from splitbits.runtime.client import LinkError, parse_http_url, print_send, send_images, send_result, unanswered
    from splitbits.runtime.inputs import inputs_from_args
    from splitbits.runtime.link import client_tls_context, parse_hostport
    from splitbits.runtime.pipeline import EdgeEncoder
    from splitbits.runtime.progress import progress_bar
    from splitbits.runtime.report import write_json

    http_path = None
    try:
        if args.server.startswith(("http://", "https://")):
            host, port, http_path = parse_http_url(args.server)
        else:
            host, port = parse_hostport(args.server)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    tls = None
    if http_path is not None and (args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        raise CliError("--tls-* are for the TCP server; http:// is the plain HTTP of `serve --ray`")
    if args.tls_ca:
        tls = client_tls_context(args.tls_ca, args.tls_cert, args.tls_key)
    elif args.tls_cert or args.tls_key or args.tls_server_name:
        raise CliError("--tls-cert/--tls-key/--tls-server-name need --tls-ca (the CA that signed the server's "
                       "certificate)")
    enc = EdgeEncoder(args.bundle, args.backend, coder=args.coder, **backend_options(args))
    enc.warmup()
    inputs = inputs_from_args(enc.bundle.input_shape, args)
    with progress_bar(len(inputs), "send", disabled=args.no_progress) as bar:
        outcome = asyncio.run(send_images(
            enc, host, port, inputs.images, inputs.labels, mbps=args.link_mbps, concurrency=args.concurrency,
            connections=args.connections, progress=bar.advance, tls=tls, server_hostname=args.tls_server_name,
            http_path=http_path))
    server = args.server if http_path is not None else f"{host}:{port}"
    result = send_result(enc, inputs, outcome, server, mbps=args.link_mbps, concurrency=args.concurrency,
                         connections=args.connections)
    if result["answered_ok"] == 0 and outcome.connection_errors:
        # nothing answered because the server refused or dropped us: say why, in one line
        reason = outcome.connection_errors[0]
        if tls is None and reason.endswith("before any answer"):
            reason += " (if it serves TLS, pass --tls-ca)"
        result["status"], result["reason"] = "failed", reason
        if args.json:
            write_json(args.json, result)
        raise LinkError(reason)
    print_send(result)
    if args.json:
        write_json(args.json, result)
    problems = unanswered(result, outcome)
    for line in problems:
        print(f"splitbits send: {line}", file=sys.stderr)
    return 1 if problems else 0


COMMANDS = {
    "warmup": Command("compile/load the coders (and optionally a bundle) so the first packet is not late",
                      add_warmup_arguments, run_warmup),
    "verify": Command("check a backend against a bundle's golden/ reference (hashes, tensors, exact symbols)",
                      add_verify_arguments, run_verify),
    "serve": Command("server half of the split: TCP server (or --ray: Ray Serve replicas), decode + tail with "
                     "dynamic batching",
                     add_serve_arguments, run_serve, description=SERVE_DESCRIPTION),
    "send": Command("edge client: encode images, send packets to a server (optional link-rate emulation)",
                    add_send_arguments, run_send, description=SEND_DESCRIPTION),
}
