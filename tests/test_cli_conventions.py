# -- collect: hubble's flags -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("hubble-relay", "hubble-relay:4245"),
        ("127.0.0.1", "127.0.0.1:4245"),
        ("[::1]", "[::1]:4245"),
        ("hubble-relay.kube-system.svc:80", "hubble-relay.kube-system.svc:80"),
        ("[::1]:4245", "[::1]:4245"),
    ],
)
def test_a_relay_address_without_a_port_takes_hubbles_default(given: str, used: str) -> None:
    from flowpipe.sources._relay_connect import split_address, with_default_port

    assert with_default_port(given) == used
    split_address(with_default_port(given))  # a valid HOST:PORT


def test_collect_takes_hubbles_spellings(tmp_path: Path) -> None:
    collect = cli.commands["collect"]
    names = {opt: param.name for param in collect.params for opt in getattr(param, "opts", [])}
    for hubble, ours in [
        ("--server", "--relay"),
        ("--tls-ca-cert-files", "--tls-ca"),
        ("--tls-client-cert-file", "--tls-cert"),
        ("--tls-client-key-file", "--tls-key"),
        ("--node-name", "--node"),
        ("-n", "--namespace"),
    ]:
        assert names[hubble] == names[ours], hubble
    # the aliases reach the same checks: a client certificate without its key is refused before connecting
    cert = tmp_path / "client.crt"
    cert.write_text("not used")
    result = invoke(
        "collect", "--server", "127.0.0.1", "--tls-client-cert-file", str(cert), "--dataset", str(tmp_path / "d"),
        "--metrics-address", "off",
    )  # fmt: skip
    assert result.exit_code == 2 and "--tls-cert and --tls-key go together" in result.output
