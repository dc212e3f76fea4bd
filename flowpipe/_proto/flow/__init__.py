"""Generated stubs of the Hubble `flow` proto package (scripts/gen_protos.py; do not edit)."""
