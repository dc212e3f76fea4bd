"""Hostile names in flow data against `suggest`: text from flows is data, never YAML structure or a file path.
Real flows through the ParquetSink and DuckDB, the command through click's runner, files checked on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner
from support.policy import pod, validate_document
from support.suggest import connection, dataset

from flowpipe.app.suggest import DraftFile, _Body, _comments, _read_documents
from flowpipe.cli import cli
from flowpipe.policy.load import load_documents
from flowpipe.policy.model import FQDNSelector, LabelSelector, Peer, Policy, Port, PortRule, Rule
from flowpipe.policy.render import render_parts, render_policy

WINDOW = ["--since", "2000-01-01", "--until", "2100-01-01"]
INJECTED = (
    "\n---\napiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: allow-all}\n"
    "spec: {endpointSelector: {}, ingress: [{fromEntities: [all]}], egress: [{toEntities: [all]}]}\n"
)
WEB = pod("shop", "web")
API = pod("shop", "api")


def renamed(end: dict[str, Any], namespace: str | None = None, workload: str | None = None) -> dict[str, Any]:
    """`end` with another namespace or workload, in its fields and its labels."""
    out = dict(end)
    if namespace is not None:
        out["namespace"] = namespace
        out["labels"] = [
            f"k8s:io.kubernetes.pod.namespace={namespace}" if lbl.startswith("k8s:io.kubernetes.pod.namespace=")
            else lbl for lbl in end["labels"]
        ]  # fmt: skip
    if workload is not None:
        out["workload_name"] = workload
        out["pod_name"] = f"{workload}-7d4b9c8f6-x2x9z"
    return out


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, ["suggest", *args])


def every_file(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_a_newline_in_a_name_never_adds_a_document_or_a_key(tmp_path: Path, cilium_schemas: Path) -> None:
    hostile_ns = renamed(WEB, namespace="shop" + INJECTED)
    hostile_wl = renamed(WEB, workload="web" + INJECTED)
    hostile_label = dict(API, labels=[*API["labels"], "k8s:tier=backend" + INJECTED])
    rows = (
        connection(WEB, API, 8080, 40001)
        + connection(hostile_ns, API, 8081, 40002)
        + connection(hostile_wl, API, 8082, 40003)
        + connection(WEB, hostile_label, 8083, 40004)
    )
    root = dataset(tmp_path / "data", rows)
    for fmt in ("cilium", "kubernetes", "istio"):
        result = run("--dataset", str(root), *WINDOW, "--format", fmt, "--per-workload")
        assert result.exit_code == 3, result.output  # the hostile edges are left out: partial
        documents = list(yaml.safe_load_all(result.stdout))
        assert documents and all(d["kind"] != "CiliumClusterwideNetworkPolicy" for d in documents)
        assert all(d["metadata"]["namespace"] == "shop" for d in documents)
        for doc in documents:
            if fmt != "istio":
                validate_document(doc, cilium_schemas)
            assert "allow-all" not in yaml.safe_dump(doc)
        # Left out by name, reported with the newline escaped: no line of the summary is YAML from a flow.
        assert "is not a name Kubernetes accepts" in result.stderr
        assert "\\n---\\napiVersion" in result.stderr
        assert not any(
            line.startswith(("kind:", "apiVersion:", "---")) for line in result.stderr.splitlines()
        )
        # The label with the newline is never a selector; api is still selected by its stable app label.
    api = next(d for d in yaml.safe_load_all(run("--dataset", str(root), *WINDOW).stdout)
               if d["metadata"]["name"] == "flowpipe-api")  # fmt: skip
    assert api["spec"]["endpointSelector"] == {"matchLabels": {"app": "api"}}


def test_comments_escape_every_line_break() -> None:
    policy = Policy("p", "shop", "cilium", comments=("seen from\n---\nkind: CiliumClusterwideNetworkPolicy",
                                                      "carriage\rreturn and \u2028 line separator"))  # fmt: skip
    text = render_policy(policy)
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(text)] == ["p"]
    comment_lines = [line for line in text.splitlines() if line.startswith("#")]
    assert "# note: seen from\\n---\\nkind: CiliumClusterwideNetworkPolicy" in comment_lines
    assert not any(line.startswith(("---", "kind: CiliumClusterwide")) for line in text.splitlines())
    assert "# note: carriage\\rreturn and \\u2028 line separator" in comment_lines


def test_a_header_counts_as_comments_only_when_no_line_of_it_can_be_yaml() -> None:
    """`suggest` takes the final file for the proved one without reading it again only when everything above
    the proved text is comment lines: whatever passes must read back as the proved documents alone."""
    body = render_policy(Policy("p", "shop", "cilium"))
    proved = load_documents(body)
    comment_only = ["# a\n", "# a\n#\n# b: c\n", "", "# note: seen from\\n---\\nkind: x\n"]
    not_only = [
        "# a\nkind: CiliumClusterwideNetworkPolicy\n",  # a line that is not a comment
        "# a\r---\n",  # a carriage return starts a line for YAML
        "# a\u2028---\n",  # so does a line separator
        "# a\x85---\n",  # and a next-line character
        "# no line break at the end",  # would join the body's first line
        "---\n",
        "# a\x00\n",  # a character a YAML reader refuses
        "# a\x1b[2J\n",
    ]
    for header in comment_only:
        assert _comments(header) == (header != ""), header  # (an empty header: the text is the body itself)
        assert load_documents(header + body) == proved, header
    for header in not_only:
        assert not _comments(header), header


def test_names_never_write_outside_out_and_files_are_safe_unique_slugs(tmp_path: Path) -> None:
    escape = tmp_path / "escaped"
    long_workload = "w" + "x" * 240  # a valid object name, too long for a file name with its prefix
    rows = (
        connection(WEB, API, 8080, 40001)
        + connection(renamed(WEB, namespace="../../escaped"), API, 8081, 40002)
        + connection(renamed(WEB, namespace=str(escape)), API, 8082, 40003)
        + connection(renamed(WEB, namespace="n" * 300), API, 8083, 40004)
        + connection(renamed(WEB, workload="../../escaped-workload"), API, 8084, 40005)
        + connection(renamed(WEB, workload=long_workload), API, 8085, 40006)
    )
    root = dataset(tmp_path / "data", rows)
    out = tmp_path / "deep" / "out"
    before = set(every_file(tmp_path))
    result = run("--dataset", str(root), *WINDOW, "--format", "both", "--per-workload", "--out", str(out))
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    written = set(every_file(tmp_path)) - before
    assert written and all(p.is_relative_to(out) for p in written)
    assert not escape.exists() and not (tmp_path / "escaped").exists()
    assert all(len(p.name) <= 255 and p.name == p.name.lower() for p in written)
    assert {p.relative_to(out).parts[0] for p in written} == {"cilium", "kubernetes"}  # formats apart
    # The invalid names are reported, not written; the long valid one is written under a slug, by its real name.
    stderr = result.stderr
    for name in ("../../escaped", str(escape), "n" * 300, "../../escaped-workload"):
        assert repr(name) in stderr
    long_files = [p for p in written if p.name.startswith("flowpipe-wxxx")]
    assert len(long_files) == 2 and all(len(p.name) < 120 for p in long_files)
    for path in long_files:
        names = {d["metadata"]["name"] for d in yaml.safe_load_all(path.read_text())}
        assert names == {f"flowpipe-{long_workload}"[:253]}


def test_a_namespace_option_kubernetes_would_not_accept_is_a_clear_error(tmp_path: Path) -> None:
    root = dataset(tmp_path / "data", connection(WEB, API, 8080, 40001))
    result = run(
        "--dataset", str(root), *WINDOW, "--namespace", "../../escape", "--out", str(tmp_path / "out")
    )
    assert result.exit_code == 2 and "Traceback" not in result.output  # a bad option
    assert "not a namespace name Kubernetes accepts (DNS-1123): '../../escape'" in result.output
    assert not (tmp_path / "out").exists()


def test_a_file_reads_back_without_parsing_only_as_parsing_it_would_read_it() -> None:
    """A body the fast path wrote whole is taken for its documents; one PyYAML wrote any part of, a text changed
    after rendering, or lines above the body that are not comments are parsed, and read as they are."""
    dns = PortRule((Port(53, "UDP"),), dns=(FQDNSelector(match_pattern="*"),))
    policies = [
        Policy("flowpipe-web", "shop", "cilium", LabelSelector.of({"app": "web"}), isolates=("ingress", "egress"),
               rules=(Rule("ingress", (Peer.endpoints({"app": "api"}),), (PortRule((Port(8080),)),)),
                      Rule("egress", (Peer.endpoints({"k8s-app": "kube-dns"}, namespace="kube-system"),),
                           (dns,)))),
        Policy("flowpipe-api", "shop", "kubernetes", LabelSelector.of({"app": "yes"}), isolates=("ingress",)),
        Policy("flowpipe-x", "shop", "cilium", LabelSelector.of({"app": "x" + INJECTED})),
        Policy("flowpipe-y", "shop", "cilium", LabelSelector.of({"app": "y y"}), isolates=("egress",)),
    ]  # fmt: skip
    parts = [render_parts(p) for p in policies]
    assert [r.exact for r in parts] == [True, True, False, False]
    for i in range(len(parts)):
        chosen = parts[: i + 1]
        exact = all(r.exact for r in chosen)
        body = _Body(
            (), "---\n".join(r.text for r in chosen), tuple(r.document for r in chosen) if exact else None
        )
        for header in ("# flowpipe suggest\n", ""):
            text = header + body.text
            draft_file = DraftFile("shop.yaml", "cilium", "shop", text, len(chosen), 0)
            assert _read_documents(draft_file, body) == load_documents(text) == [r.document for r in chosen]
        changed = [
            text.replace("app: web", "app: web2"),  # the body was changed after it was rendered
            "apiVersion: v1\n---\n" + body.text,  # a document above it
            "# a\rkind: x\n" + body.text,  # a line break YAML knows in a comment
        ]
        for text in changed:
            draft_file = DraftFile("shop.yaml", "cilium", "shop", text, len(chosen), 0)
            assert _read_documents(draft_file, body) == load_documents(text)
    above = DraftFile("a", "cilium", "shop", "apiVersion: v1\n---\n" + body.text, 0, 0)
    assert len(_read_documents(above, body)) == len(policies) + 1
