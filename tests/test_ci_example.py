"""docker/ci/: the worked CI examples' commands, run as their CI would, against a dataset on a local S3 server.

The GitHub Actions workflow and the GitLab CI job are read as YAML; their shell steps (all but installing
flowpipe) run in bash, with their variables set as the CI would set them, in a git repository where a branch
changes the policies of its merge base. `flowpipe` on the PATH is this checkout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from support.review import check_junit, check_sarif

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "docker" / "ci"
EXPRESSION = re.compile(r"\$\{\{\s*(.+?)\s*\}\}")


def sim_docs(sim: Any) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(sim.simulator.policies.to_yaml()))


def tighten_port(docs: list[dict[str, Any]]) -> None:
    web = next(d for d in docs if d["metadata"] == {"name": "web", "namespace": "production"})
    web["spec"]["ingress"][0]["toPorts"][0]["ports"].pop()  # 8443 no more


def rename(docs: list[dict[str, Any]]) -> None:
    docs[0]["metadata"]["name"] = "web-v2"


@pytest.fixture(scope="module")
def dataset(sim_faults: Any, s3_endpoint: str) -> tuple[str, str]:
    """The simulated dataset, uploaded object by object to a bucket of the local S3 server: (url, endpoint)."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="ci-example")
    for path in sorted(p for p in sim_faults.root.rglob("*") if p.is_file()):
        client.upload_file(str(path), "ci-example", f"flows/{path.relative_to(sim_faults.root).as_posix()}")
    return "s3://ci-example/flows", s3_endpoint


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def repository(path: Path, sim: Any, change: Any) -> tuple[Path, str]:
    """A repository with the simulator's policies on main and a branch that changes them; (repo, merge base)."""
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "ci@example.com")
    git(path, "config", "user.name", "ci")
    docs = sim_docs(sim)
    policies = path / "policies"
    policies.mkdir()

    def write() -> None:
        (policies / "production.yaml").write_text(yaml.safe_dump_all(docs[:7], sort_keys=False))
        (policies / "others.yaml").write_text(yaml.safe_dump_all(docs[7:], sort_keys=False))

    write()
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "policies")
    base = git(path, "rev-parse", "HEAD")
    git(path, "update-ref", "refs/remotes/origin/main", base)  # as a checkout with fetch-depth 0 has it
    git(path, "checkout", "-q", "-b", "change")
    change(docs)
    write()
    git(path, "commit", "-q", "-am", "change")
    return path, base


def flowpipe_on_path(tmp_path: Path) -> dict[str, str]:
    """The environment of a CI job where `flowpipe` is this checkout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "flowpipe"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m flowpipe "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWPIPE_", "GITHUB_", "CI_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def substitute(text: str, values: dict[str, str]) -> str:
    """GitHub's `${{ ... }}` expressions replaced as the runner would for this pull request."""

    def one(match: re.Match[str]) -> str:
        expression = match.group(1)
        if expression == "!cancelled()":
            return "true"
        if " || " in expression:  # `vars.X || 'default'`
            name, default = expression.split(" || ", 1)
            return values.get(name, default.strip("'"))
        assert expression in values, f"the workflow uses {expression}: give it a value in this test"
        return values[expression]

    return EXPRESSION.sub(one, text)


def run_github(repo: Path, env: dict[str, str], values: dict[str, str], runner_temp: Path) -> dict[str, int]:
    workflow = yaml.safe_load((CI / "github-actions.yml").read_text())
    (job,) = workflow["jobs"].values()
    job_env = {k: substitute(str(v), values) for k, v in job["env"].items()}
    statuses = {}
    for step in job["steps"]:
        if "run" not in step or step.get("name") == "Install flowpipe":
            continue
        script = substitute(step["run"], values)
        assert "flowpipe" in script or "git" in script
        done = subprocess.run(
            ["bash", "-e", "-c", script],
            check=False,
            cwd=repo,
            env={**env, **job_env, "RUNNER_TEMP": str(runner_temp)},
            capture_output=True,
            text=True,
        )
        assert done.returncode in (0, 1), done.stderr
        statuses[step.get("id") or step["name"]] = done.returncode
    return statuses


def run_gitlab(
    repo: Path, env: dict[str, str], variables: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    job = yaml.safe_load((CI / "gitlab-ci.yml").read_text())["policy-review"]
    script = "\n".join(["set -eo pipefail", *job["script"]])
    job_vars = {k: str(v) for k, v in job["variables"].items()}
    return subprocess.run(
        ["bash", "-c", script],
        check=False,
        cwd=repo,
        env={**env, **job_vars, **variables},
        capture_output=True,
        text=True,
    )


def s3_values(dataset: str, endpoint: str) -> dict[str, str]:
    return {
        "vars.FLOWPIPE_DATASET": dataset,
        "vars.FLOWPIPE_S3_ENDPOINT": endpoint,
        "vars.AWS_REGION": "us-east-1",
        "secrets.FLOWPIPE_S3_ACCESS_KEY_ID": "flowpipe-test",
        "secrets.FLOWPIPE_S3_SECRET_ACCESS_KEY": "flowpipe-test",
        "github.base_ref": "main",
    }


def test_github_workflow_fails_on_a_break_and_uploads_valid_sarif(
    sim_faults: Any, dataset: tuple[str, str], tmp_path: Path
) -> None:
    env = flowpipe_on_path(tmp_path)
    values = s3_values(*dataset)
    repo, _ = repository(tmp_path / "breaks", sim_faults, tighten_port)
    statuses = run_github(repo, env, values, tmp_path / "runner-breaks")
    assert statuses["replay"] == 1  # the job fails on the break
    files = {f"policies/{p.name}": p for p in (repo / "policies").glob("*.yaml")}
    results = check_sarif(json.loads((repo / "reports" / "replay.sarif").read_text()), files)
    denied = [r for r in results if r["ruleId"] == "newly-denied"]
    assert denied and {r["properties"]["port"] for r in denied} == {8443}
    assert {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in denied} == {
        "policies/production.yaml"
    }
    check_sarif(json.loads((repo / "reports" / "audit.sarif").read_text()), files)
    check_junit((repo / "reports" / "replay.xml").read_text())
    check_junit((repo / "reports" / "audit.xml").read_text())
    # a change that only renames a policy passes
    repo, _ = repository(tmp_path / "renames", sim_faults, rename)
    assert run_github(repo, env, values, tmp_path / "runner-renames")["replay"] == 0


def test_gitlab_job_fails_on_a_break_and_keeps_junit(
    sim_faults: Any, dataset: tuple[str, str], tmp_path: Path
) -> None:
    env = flowpipe_on_path(tmp_path)
    variables = {
        "FLOWPIPE_DATASET": dataset[0],
        "FLOWPIPE_S3_ENDPOINT": dataset[1],
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "flowpipe-test",
        "AWS_SECRET_ACCESS_KEY": "flowpipe-test",
    }
    repo, base = repository(tmp_path / "breaks", sim_faults, tighten_port)
    done = run_gitlab(repo, env, {**variables, "CI_MERGE_REQUEST_DIFF_BASE_SHA": base})
    assert done.returncode == 1, done.stderr
    assert "would newly be denied" in done.stderr
    root = check_junit((repo / "reports" / "replay.xml").read_text())
    failed = [c.get("name") for c in root.iter("testcase") if c.find("failure") is not None]
    assert failed == ["production/web"]
