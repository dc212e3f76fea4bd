"""Generated stubs of the Hubble `peer` proto package (scripts/gen_protos.py; do not edit)."""
