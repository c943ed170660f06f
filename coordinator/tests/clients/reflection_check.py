#!/usr/bin/env python3
"""Lists a gRPC server's services with grpcio's standard reflection client (which speaks
grpc.reflection.v1alpha) and resolves a service's methods through it (run by
coordinator/tests/cluster/http.rs).

    reflection_check.py HOST:PORT SERVICE...

Exits 1 unless every SERVICE is listed and resolvable.
"""

import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

addr, wanted = sys.argv[1], sys.argv[2:]
with grpc.insecure_channel(addr) as channel:
    db = ProtoReflectionDescriptorDatabase(channel)
    services = db.get_services()
    print(f"  {addr}: {', '.join(services)}")
    pool = DescriptorPool(db)
    for name in wanted:
        if name not in services:
            print(f"reflection_check: FAILED: {name} not listed by {addr}", file=sys.stderr)
            sys.exit(1)
        methods = [m.name for m in pool.FindServiceByName(name).methods]
        if not methods:
            print(f"reflection_check: FAILED: {name} has no methods", file=sys.stderr)
            sys.exit(1)
        print(f"  {name}: {', '.join(methods)}")
print("reflection_check: ok")
