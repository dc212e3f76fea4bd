"""GetFlowsRequest.field_mask: validate Flow field paths and keep only those fields of a flow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from flowpipe._proto.flow import flow_pb2
from flowpipe.errors import ConfigError

MaskTree = dict[str, "MaskTree | None"]
"""Field name → subtree of kept fields, or None to keep the whole field."""


@dataclass(frozen=True)
class MaskPlan:
    """A compiled field mask: the fields to clear at this level and the plans of partly kept sub-messages."""

    clear: tuple[str, ...]
    children: tuple[tuple[str, MaskPlan], ...]


def _plan(tree: MaskTree, descriptor: Descriptor) -> MaskPlan:
    # Clearing the complement by name is cheaper than listing the set fields of every flow.
    clear = tuple(f.name for f in descriptor.fields if f.name not in tree)
    children = tuple(
        (name, _plan(subtree, descriptor.fields_by_name[name].message_type))
        for name, subtree in tree.items()
        if subtree is not None
    )
    return MaskPlan(clear, children)


def compile_field_mask(
    paths: Sequence[str], descriptor: Descriptor = flow_pb2.Flow.DESCRIPTOR
) -> MaskPlan | None:
    """A MaskPlan for `paths` (proto field names, dotted), or None for no mask; raises ConfigError if invalid.

    Like protobuf's FieldMask rules, a repeated field may only be the last element of a path.
    """
    if not paths:
        return None
    tree: MaskTree = {}
    for path in paths:
        node: MaskTree = tree
        message: Descriptor | None = descriptor
        parts = path.split(".")
        for i, part in enumerate(parts):
            field = message.fields_by_name.get(part) if message is not None else None
            if field is None:
                raise ConfigError(
                    f"field_mask: invalid path {path!r}: {part!r} is not a field of {_name(message)}"
                )
            last = i == len(parts) - 1
            if not last and (field.type != FieldDescriptor.TYPE_MESSAGE or _is_repeated(field)):
                raise ConfigError(f"field_mask: invalid path {path!r}: {part!r} has no sub-fields to select")
            if last:
                node[part] = None  # the whole field, whatever was selected below it before
                break
            child = node.get(part, {})
            if child is None:
                break  # a parent path already keeps the whole field
            node[part] = child
            node = child
            message = field.message_type
    return _plan(tree, descriptor)


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 6 has `is_repeated`; older versions only `label`.
    is_repeated = getattr(field, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def _name(message: Descriptor | None) -> str:
    return message.full_name if message is not None else "?"


def apply_field_mask(message: Message, plan: MaskPlan) -> None:
    """Clear, in place, every field of `message` that the mask does not keep."""
    for name in plan.clear:
        message.ClearField(name)
    for name, child in plan.children:
        if message.HasField(name):
            apply_field_mask(getattr(message, name), child)
