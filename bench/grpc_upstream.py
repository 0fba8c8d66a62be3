"""The gRPC benchmark's upstream: a grpcio server per version, `demo.Echo/Unary`
answering every call with its version's name and the request's bytes.

    python -m bench.grpc_upstream blue=PORT green=PORT

Raw bytes in and out (no generated code); one thread pool per server.
"""

from __future__ import annotations

import sys
from concurrent import futures

import grpc

SERVICE = "demo.Echo"


def serve(ports: dict[str, int]) -> None:
    servers = []
    for name, port in ports.items():
        tag = name.encode() + b":"

        def unary(request: bytes, context: grpc.ServicerContext, tag: bytes = tag) -> bytes:
            return tag + request

        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
        )
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        servers.append(server)
    for server in servers:
        server.wait_for_termination()


if __name__ == "__main__":
    serve({k: int(v) for k, v in (arg.split("=", 1) for arg in sys.argv[1:])})
