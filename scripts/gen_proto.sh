#!/usr/bin/env bash
# Regenerate jaxserve/server/proto/jaxserve_pb2{,_grpc}.py{,i} from jaxserve.proto.
#
# The generator is pinned (grpcio-tools 1.76.0, the `dev` extra): its output imports on
# protobuf 6.31+ and 7.x and grpcio 1.76+, while newer generators stamp a runtime check that
# fails on older grpcio. Run from anywhere; the proto is compiled with the repository root
# as its include path, so the generated service module imports
# `from jaxserve.server.proto import jaxserve_pb2`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

want="1.76.0"
have="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')"
if [[ "$have" != "$want" ]]; then
  echo "gen_proto.sh: grpcio-tools $have found, $want needed (pip install grpcio-tools==$want)" >&2
  exit 1
fi

"$PYTHON" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  jaxserve/server/proto/jaxserve.proto
echo "generated jaxserve/server/proto/jaxserve_pb2.py, jaxserve_pb2.pyi, jaxserve_pb2_grpc.py"
