#!/usr/bin/env bash
# A client nobody here wrote talks to a running device: Python's grpcio and
# grpcio-reflection (from PyPI, in a virtual environment this script makes) list the
# services through reflection, call grpc.health.v1.Health/Check without a token, call
# EdgeRuntime/Status without a token (must be refused) and Generate with it. No .proto file
# is used: every message type comes from the server's reflection.
#
# usage: scripts/grpc-python-check.sh HOST:PORT TOKEN_FILE [PROMPT_TOKENS [MAX_TOKENS]]
#   PROMPT_TOKENS: comma-separated token ids (default 1,2,3); MAX_TOKENS default 8.
# Prints progress on stderr and one JSON line on stdout:
#   {"services": [...], "health": "SERVING", "no_token": "UNAUTHENTICATED", "tokens": [...]}
# The venv is kept in $EDGE_PY_VENV (default: target/grpc-python-venv in the repository).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HOST:PORT TOKEN_FILE [PROMPT_TOKENS [MAX_TOKENS]]" >&2
  exit 2
fi
addr=$1
token_file=$2
prompt=${3:-1,2,3}
max_tokens=${4:-8}
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${EDGE_PY_VENV:-$repo/target/grpc-python-venv}

if ! "$venv/bin/python" -c 'import grpc, grpc_reflection, google.protobuf' 2>/dev/null; then
  echo "making the Python venv in $venv (grpcio, grpcio-reflection from PyPI)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check grpcio grpcio-reflection protobuf >&2
fi

"$venv/bin/python" - "$addr" "$token_file" "$prompt" "$max_tokens" <<'PY'
import collections
import json
import sys

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

addr, token_file, prompt, max_tokens = sys.argv[1:5]
token = open(token_file).read().strip()
metadata = (("authorization", "Bearer " + token),)


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token to every call (reflection is a stream-stream call)."""

    def _add(self, d):
        return _Details(
            d.method,
            d.timeout,
            list(d.metadata or []) + list(metadata),
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._add(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._add(details), requests)


channel = grpc.insecure_channel(addr)
authed = grpc.intercept_channel(channel, Bearer())

db = ProtoReflectionDescriptorDatabase(authed)
services = sorted(db.get_services())
print("services:", services, file=sys.stderr)
pool = descriptor_pool.DescriptorPool(db)


def method_types(service, method):
    m = pool.FindServiceByName(service).FindMethodByName(method)
    return GetMessageClass(m.input_type), GetMessageClass(m.output_type)


# Health needs no token.
req_t, resp_t = method_types("grpc.health.v1.Health", "Check")
check = channel.unary_unary(
    "/grpc.health.v1.Health/Check",
    request_serializer=req_t.SerializeToString,
    response_deserializer=resp_t.FromString,
)
health = check(req_t(service="edge.runtime.v1.EdgeRuntime"), timeout=10)
health_name = resp_t.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[health.status].name
print("health:", health_name, file=sys.stderr)

# Everything else does.
req_t, resp_t = method_types("edge.runtime.v1.EdgeRuntime", "Status")
status = channel.unary_unary(
    "/edge.runtime.v1.EdgeRuntime/Status",
    request_serializer=req_t.SerializeToString,
    response_deserializer=resp_t.FromString,
)
try:
    status(req_t(), timeout=10)
    no_token = "OK"
except grpc.RpcError as e:
    no_token = e.code().name
print("Status without token:", no_token, file=sys.stderr)
reply = status(req_t(), metadata=metadata, timeout=10)
print("Status with token: active", reply.active_sha256, file=sys.stderr)

req_t, resp_t = method_types("edge.runtime.v1.EdgeRuntime", "Generate")
generate = channel.unary_stream(
    "/edge.runtime.v1.EdgeRuntime/Generate",
    request_serializer=req_t.SerializeToString,
    response_deserializer=resp_t.FromString,
)
request = req_t(
    prompt_tokens=[int(t) for t in prompt.split(",")],
    max_tokens=int(max_tokens),
    ignore_eos=True,
)
tokens = []
done = False
for r in generate(request, metadata=metadata, timeout=60):
    if r.HasField("token"):
        tokens.append(r.token)
    done = done or r.done
assert done, "Generate ended without its final message"
print("Generate:", tokens, file=sys.stderr)
print(json.dumps({"services": services, "health": health_name, "no_token": no_token, "tokens": tokens}))
PY
