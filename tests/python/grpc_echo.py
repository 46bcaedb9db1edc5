"""A gRPC backend and client for tests/l7.rs, with the real grpcio.

No generated stubs: the methods of service `echo.Echo` take and return raw
bytes.

  server NAME ADDR      serve until killed; print "call ID" per unary call
  unary TARGET N [MS]   N unary calls over one channel (MS ms apart);
                        print each reply (the server's name), or
                        "FAILED ID CODE"
  streams TARGET        a server-streaming call (5 messages) and a
                        bidirectional one (3 messages), printing each
                        message, then the trailing metadata's "x-trailer"
"""

import sys
import time
from concurrent import futures

import grpc

SERVICE = "echo.Echo"


def server(name, addr):
    def unary(req, ctx):
        print("call", req.decode(), flush=True)
        return name.encode()

    def server_stream(req, ctx):
        for i in range(5):
            yield f"{name} {i}".encode()
        ctx.set_trailing_metadata((("x-trailer", f"{name} done"),))

    def bidi(reqs, ctx):
        for r in reqs:
            yield f"{name} {r.decode()}".encode()
        ctx.set_trailing_metadata((("x-trailer", f"{name} done"),))

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    s.add_generic_rpc_handlers((handler,))
    s.add_insecure_port(addr)
    s.start()
    print("serving", addr, flush=True)
    s.wait_for_termination()


def unary(target, n, pause_ms=0):
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(f"/{SERVICE}/Unary")
        for i in range(n):
            if pause_ms:
                time.sleep(pause_ms / 1000)
            try:
                print(call(str(i).encode(), timeout=5).decode(), flush=True)
            except grpc.RpcError as e:
                print("FAILED", i, e.code().name, flush=True)


def streams(target):
    with grpc.insecure_channel(target) as ch:
        ss = ch.unary_stream(f"/{SERVICE}/ServerStream")(b"go", timeout=10)
        for m in ss:
            print("stream", m.decode())
        print("trailer", dict(ss.trailing_metadata()).get("x-trailer"))
        bd = ch.stream_stream(f"/{SERVICE}/Bidi")(
            iter([b"a", b"b", b"c"]), timeout=10
        )
        for m in bd:
            print("bidi", m.decode())
        print("trailer", dict(bd.trailing_metadata()).get("x-trailer"))
        print("code", bd.code().name, flush=True)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "server":
        server(sys.argv[2], sys.argv[3])
    elif cmd == "unary":
        unary(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0)
    elif cmd == "streams":
        streams(sys.argv[2])
    else:
        sys.exit(f"unknown command {cmd}")
