"""Generated gRPC code for jaxserve.v1 (scripts/gen_proto.sh); do not edit by hand."""
