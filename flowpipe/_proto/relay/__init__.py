"""Generated stubs of the Hubble `relay` proto package (scripts/gen_protos.py; do not edit)."""
