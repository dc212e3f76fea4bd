"""Generated Hubble protobuf and gRPC stubs, one subpackage per proto package (scripts/gen_protos.py; do not edit)."""
