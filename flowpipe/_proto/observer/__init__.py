"""Generated stubs of the Hubble `observer` proto package (scripts/gen_protos.py; do not edit)."""
