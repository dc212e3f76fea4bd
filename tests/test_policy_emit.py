"""The policy document writer: PyYAML's exact bytes, read back by the C loader as the same document, and text
from flows kept data (quoted by PyYAML) whatever it holds."""

from __future__ import annotations

import random
from typing import Any

import pytest
import yaml

from flowpipe.policy._emit import dump_document, exact_document, pyyaml_document
from flowpipe.policy.load import load_documents, parse_policies
from flowpipe.policy.model import LabelSelector, Peer, Policy, Port, PortRule, Rule
from flowpipe.policy.render import render_policy

HOSTILE = [
    "it's",
    'say "hi"',
    "a: b",
    "a:",
    ":a",
    "key:value",
    "line\nbreak",
    "cr\rhere",
    "tab\there",
    "{}",
    "[x]",
    "a,b",
    "&anchor",
    "*alias",
    "!tag",
    "|",
    ">",
    "%directive",
    "@at",
    "`tick`",
    "#comment",
    "a #comment",
    "- item",
    "-",
    "? key",
    "---",
    "...",
    "é-ünïcode",
    "日本",
    "\u2028sep",
    "\x85next",
    " lead",
    "trail ",
    "",
    "yes",
    "on",
    "no",
    "off",
    "Y",
    "n",
    "true",
    "False",
    "null",
    "~",
    "123",
    "0x1F",
    "0o17",
    "1e3",
    "1_000",
    "1:20",
    ".inf",
    ".NaN",
    "2024-06-01",
    "=",
    "<<",
    "x" * 122,
    "x" * 123,
    "word " * 40,
    "*",
    "*.example.com",
    "**.example.com",
    '@a"b\\c',
    "`" + "y" * 130,
    "%" * 200,
]
PLAIN = ["wl-1", "k8s:app", "k8s:io.kubernetes.pod.namespace", "app=web", "10.0.0.0/8", "/v1/items", "_x"]


def pyyaml(document: dict[str, Any], allow_unicode: bool = True) -> str:
    return pyyaml_document(document, allow_unicode=allow_unicode)


def policy_like(value: str, number: int) -> dict[str, Any]:
    """A CiliumNetworkPolicy-shaped document with `value` in every place a name from flows can reach."""
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": value, "namespace": value, "labels": {value: value}},
        "spec": {
            "endpointSelector": {"matchLabels": {"k8s:app": value, value: "x"}},
            "ingress": [
                {
                    "fromEndpoints": [{"matchLabels": {value: value}}, {}],
                    "toPorts": [{"ports": [{"port": str(number), "protocol": "TCP", "endPort": number + 1}]}],
                },
                {},
            ],
            "egress": [{"toEntities": [value, "world"], "toCIDR": [value]}],
            "enableDefaultDeny": {"ingress": True, "egress": False},
            "empty": [],
            "none": None,
        },
    }


@pytest.mark.parametrize("value", HOSTILE + PLAIN)
def test_hostile_and_plain_strings_give_pyyaml_bytes_and_read_back_as_data(value: str) -> None:
    document = policy_like(value, 8080)
    text = dump_document(document)
    assert text == pyyaml(document)
    assert dump_document(document, allow_unicode=False) == pyyaml(document, allow_unicode=False)
    # One document, and exactly this one: no key, list item or document was added by the string.
    assert load_documents(text) == list(yaml.safe_load_all(text))
    if "\x85" in value:
        # PyYAML writes NEL unescaped in single quotes, where both parsers fold it (as they always did): the
        # string changes, the structure does not.
        assert list(load_documents(text)[0]["metadata"]) == ["name", "namespace", "labels"]
    else:
        assert load_documents(text) == [document]


def test_generated_documents_give_pyyaml_bytes() -> None:
    """Random nests of mappings and lists over plain and hostile strings, numbers, booleans and None."""
    rng = random.Random(17)
    atoms: list[Any] = [
        *(h for h in HOSTILE if "\x85" not in h),
        *PLAIN,
        *PLAIN,
        *PLAIN,
        0,
        53,
        65535,
        -1,
        True,
        False,
        None,
        {},
        [],
    ]

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth > 3 or roll < 0.4:
            return rng.choice(atoms)
        if roll < 0.7:
            return {
                str(rng.choice(PLAIN if rng.random() < 0.8 else atoms)): value(depth + 1) for _ in range(3)
            }
        return [value(depth + 1) for _ in range(rng.randint(1, 3))]

    for _ in range(3000):
        document = {rng.choice(PLAIN): value(0) for _ in range(rng.randint(1, 4))}
        text = dump_document(document)
        assert text == pyyaml(document), document
        assert load_documents(text) == [document]


def test_a_policy_with_hostile_names_renders_as_before_and_reads_back_as_one_policy() -> None:
    for value in ("web", "x\n---\nkind: Evil", "a: {b: c}", "yes", "1:20", " pad "):
        selector = LabelSelector.of({"app": value})
        policy = Policy(
            "flowpipe-web",
            "shop",
            "cilium",
            selector=selector,
            isolates=("ingress",),
            rules=(Rule("ingress", (Peer.endpoints({"app": value}),), (PortRule((Port(8080),)),)),),
        )
        text = render_policy(policy)
        [loaded] = parse_policies(text, path="x.yaml")
        assert loaded.selector == selector
        assert loaded.rules[0].peers[0].selector == selector


def test_the_c_loader_and_the_python_loader_read_the_same_documents() -> None:
    text = "---\n".join(dump_document(policy_like(v, 80)) for v in HOSTILE + PLAIN)
    assert load_documents(text) == list(yaml.safe_load_all(text))


def test_a_stream_the_c_parser_refuses_gets_the_python_parsers_message() -> None:
    from flowpipe.errors import PolicyParseError

    with pytest.raises(PolicyParseError, match=r"invalid YAML at line 2, column"):
        load_documents("a: b\n  c: d: e\n", path="bad.yaml")


@pytest.mark.parametrize("value", HOSTILE + PLAIN)
def test_what_the_fast_path_writes_reads_back_as_the_document_itself(value: str) -> None:
    """`exact_document`'s text is never parsed by `suggest` (`Rendered.exact`): it must read back as the very
    document, types included (`'8080'` a string, 8080 an integer, `true` a boolean), and be PyYAML's bytes."""
    document = policy_like(value, 8080)
    text = exact_document(document)
    if text is None:
        return  # PyYAML writes it; suggest parses it
    assert text == pyyaml(document)
    [loaded] = load_documents(text)
    assert loaded == document

    def types(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: types(v) for k, v in value.items()}
        if isinstance(value, list):
            return [types(v) for v in value]
        return type(value)

    assert types(loaded) == types(document)


def test_the_fast_path_writes_dns_wildcards_and_leaves_spaces_and_quotes_to_pyyaml() -> None:
    for value in ("*", "*.example.com", "!x", "&y", "web", "8080", "yes", "`" + "y" * 100):
        assert exact_document(policy_like(value, 53)) is not None, value
    for value in ("* x", "*'", "x y", "a: b", "line\nbreak", "é", "'quoted'", " lead"):
        assert exact_document(policy_like(value, 53)) is None, value
