"""Every DropReason has a class; the policy decisions are exactly the deliberate ones; the table joins in SQL."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from flowpipe import drop_reasons
from flowpipe._proto.flow import flow_pb2
from flowpipe.drop_reasons import (
    DROP_REASONS,
    EXPECTED_CLASSES,
    REASON_CLASSES,
    class_lookup_keys,
    drop_reason_table,
    is_policy_decision,
    lookup,
    reason_class,
)


def test_every_enum_value_of_the_protos_has_a_class() -> None:
    enum = flow_pb2.DropReason
    missing = [name for name in enum.keys() if name not in DROP_REASONS]  # noqa: SIM118 (an enum wrapper, not a dict)
    assert missing == []
    for name, value in enum.items():
        assert DROP_REASONS[name].value == value, name
        assert DROP_REASONS[name].reason_class in REASON_CLASSES, name


def test_the_table_has_nothing_the_protos_lack() -> None:
    assert set(DROP_REASONS) == set(flow_pb2.DropReason.keys())


def test_policy_decisions_are_exactly_the_deliberate_reasons() -> None:
    decided = {name for name, reason in DROP_REASONS.items() if reason.policy_decision}
    assert decided == {"POLICY_DENIED", "POLICY_DENY", "AUTH_REQUIRED", "DENIED_BY_LB_SRC_RANGE_CHECK"}


@pytest.mark.parametrize(
    ("reason", "expected_class"),
    [
        ("CT_MAP_INSERTION_FAILED", "conntrack"),
        ("STALE_OR_UNROUTABLE_IP", "routing"),
        ("INVALID_PACKET_DROPPED", "invalid_packet"),
        ("MISSED_TAIL_CALL", "datapath"),
        ("UNSUPPORTED_L3_PROTOCOL", "unsupported_protocol"),
        ("SERVICE_BACKEND_NOT_FOUND", "service"),
        ("NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION", "not_ready"),
        ("IGMP_HANDLED", "handled"),
        ("DROP_REASON_UNKNOWN", "unknown"),
    ],
)
def test_trouble_is_not_a_policy_decision(reason: str, expected_class: str) -> None:
    assert reason_class(reason) == expected_class
    assert not is_policy_decision(reason)
    assert DROP_REASONS[reason].expected == (expected_class in EXPECTED_CLASSES)


def test_lookup_by_name_number_and_number_text() -> None:
    assert lookup("POLICY_DENIED") is lookup(133) is lookup("133")
    assert lookup("NOT_A_REASON_YET") is None
    assert lookup(9999) is None
    assert lookup(None) is None
    assert reason_class("A_REASON_FROM_A_NEWER_CILIUM") == "unknown"
    assert reason_class(" 181 ") == "policy"


def test_lookup_keys_cover_names_and_numbers() -> None:
    keys, classes = class_lookup_keys()
    assert len(keys) == len(classes) == 2 * len(DROP_REASONS)
    mapping = dict(zip(keys, classes, strict=True))
    assert mapping["POLICY_DENY"] == mapping["181"] == "policy"
    assert mapping["CT_MISSING_TCP_ACK_FLAG"] == mapping["136"] == "conntrack"


def test_every_class_is_used_and_documented() -> None:
    used = {reason.reason_class for reason in DROP_REASONS.values()}
    assert used == set(REASON_CLASSES)
    doc = drop_reasons.__doc__ or ""
    for name in REASON_CLASSES:
        assert f"`{name}`" in doc, name


def test_drop_reason_table_joins_the_flow_table_in_duckdb() -> None:
    flows = pa.table(
        {
            "verdict": ["DROPPED", "DROPPED", "DROPPED", "FORWARDED"],
            "drop_reason_desc": ["POLICY_DENIED", "CT_MAP_INSERTION_FAILED", "SOMETHING_NEW", None],
        }
    )
    reasons = drop_reason_table()
    assert reasons.num_rows == len(DROP_REASONS)
    con = duckdb.connect()
    con.register("flows", flows)
    con.register("drop_reasons", reasons)
    rows = con.execute(
        "SELECT f.drop_reason_desc, coalesce(r.reason_class, 'unknown'), coalesce(r.policy_decision, false) "
        "FROM flows f LEFT JOIN drop_reasons r USING (drop_reason_desc) WHERE f.verdict = 'DROPPED' ORDER BY 1"
    ).fetchall()
    assert rows == [
        ("CT_MAP_INSERTION_FAILED", "conntrack", False),
        ("POLICY_DENIED", "policy", True),
        ("SOMETHING_NEW", "unknown", False),
    ]
