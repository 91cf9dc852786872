"""An independent gRPC client (Python grpcio) for the coordinator's standard
services: asks grpc.health.v1 about every service and lists the services
reflection offers. Prints one JSON object.

usage: grpc_probe.py HOST:PORT CA_PEM_FILE TLS_NAME
"""

import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def main() -> None:
    addr, ca_file, tls_name = sys.argv[1:4]
    with open(ca_file, "rb") as handle:
        credentials = grpc.ssl_channel_credentials(root_certificates=handle.read())
    channel = grpc.secure_channel(addr, credentials, options=[("grpc.ssl_target_name_override", tls_name)])
    grpc.channel_ready_future(channel).result(timeout=10)

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = reflection.ServerReflectionInfo(iter([request]), timeout=10)
    services = sorted(s.name for r in responses for s in r.list_services_response.service)

    health = health_pb2_grpc.HealthStub(channel)
    statuses = {}
    for service in [""] + services:
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            statuses[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as error:
            statuses[service] = error.code().name
    print(json.dumps({"services": services, "health": statuses}))


if __name__ == "__main__":
    main()
