"""nftables rules rendered from the inventory: each port open to exactly the sources that need it.

The rules are checked with ``nft -c``, which parses them and changes nothing. They
are never loaded here: lab hosts and tests share this machine's network.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dicomfleet import credentials, firewall, render
from dicomfleet.inventory import InventoryError, load_site
from test_archive_support import EXAMPLE, LAB, file_of, inventory_document


@pytest.fixture
def example_site():
    return load_site(EXAMPLE)


@pytest.fixture
def archlab_site(tmp_path):
    path = tmp_path / "archlab.yml"
    path.write_text(yaml.safe_dump(inventory_document()))
    return load_site(path)


def _rule(site, host: str, port: int) -> firewall.Rule:
    (rule,) = [r for r in firewall.rules_for(site, host) if r.port == port]
    return rule


def _nft_check(path: Path) -> subprocess.CompletedProcess:
    assert shutil.which("nft"), "nft is missing: install the Debian package nftables (Makefile APT_PACKAGES)"
    return subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True)


def test_dicom_port_open_to_registered_senders(example_site):
    rule = _rule(example_site, "pacs1", 4242)
    assert rule.sources == ("198.51.100.12", "198.51.100.21", "198.51.100.31")


def test_https_open_to_agents_viewers_and_admins(example_site):
    rule = _rule(example_site, "pacs1", 443)
    assert rule.sources == ("198.51.100.11", "198.51.100.32", "203.0.113.0/24", "192.0.2.64/27")


def test_orthanc_http_port_closed(example_site):
    assert [r for r in firewall.rules_for(example_site, "pacs1") if r.port == 8042] == []


def test_dashboard_https_open_to_agents_viewers_and_admins(example_site):
    rule = _rule(example_site, "pacs1", 8443)
    assert rule.sources == ("198.51.100.11", "198.51.100.21", "198.51.100.32", "203.0.113.0/24", "192.0.2.64/27")


def test_dashboard_plain_port_closed_behind_nginx(example_site):
    assert [r for r in firewall.rules_for(example_site, "pacs1") if r.port == 8050] == []


def test_dashboard_plain_port_open_without_tls(tmp_path):
    document = yaml.safe_load(EXAMPLE.read_text())
    document["all"]["children"]["central"]["hosts"]["pacs1"]["dicomfleet_tls"] = False
    path = tmp_path / "plain.yml"
    path.write_text(yaml.safe_dump(document))
    rule = _rule(load_site(path), "pacs1", 8050)
    assert rule.service == "HTTP to the dashboard without TLS"


def test_ssh_limited_to_admin_networks(example_site):
    rule = _rule(example_site, "pacs1", 22)
    assert (rule.sources, rule.any_source) == (("192.0.2.64/27",), False)


def test_ssh_open_without_admin_networks():
    rule = _rule(load_site(LAB), "central", 22)
    assert rule.any_source is True


def test_share_uploads_come_from_file_server(archlab_site):
    rule = _rule(archlab_site, "vault", 8640)
    assert "127.0.10.130" in rule.sources
    assert "127.0.10.131" not in rule.sources


def test_cluster_node_https_only_from_balancer_and_viewers(archlab_site):
    rule = _rule(archlab_site, "n2", 8647)
    assert rule.sources == ("127.0.10.125",)


def test_balancer_open_to_cluster_agents(archlab_site):
    rule = _rule(archlab_site, "db", 8743)
    assert rule.sources == ("127.0.10.130",)


def test_postgresql_only_from_nodes(archlab_site):
    rule = _rule(archlab_site, "db", 5532)
    assert rule.sources == ("127.0.10.126", "127.0.10.127")


def test_cluster_nodes_accept_dicom_from_every_cluster_machine(tmp_path):
    document = inventory_document()
    scanners = document["all"]["children"]["scanners"]["hosts"]
    scanners["dx1"]["dicomfleet_orthanc"] = "n2"
    path = tmp_path / "site.yml"
    path.write_text(yaml.safe_dump(document))
    site = load_site(path)
    assert _rule(site, "n1", 4446).sources == ("127.0.0.1",)


@pytest.mark.parametrize("inventory, host", [
    (EXAMPLE, "pacs1"), (LAB, "central"),
])
def test_rendered_rules_pass_nft_check(tmp_path, inventory, host):
    site = load_site(inventory)
    plan = render.plan_host(site, host, credentials.ensure_secrets(site, tmp_path / "secrets"))
    path = tmp_path / "firewall.nft"
    path.write_text(file_of(plan, firewall.RULES_PATH).content)
    result = _nft_check(path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("host", ["vault", "n1", "n2", "db"])
def test_cluster_rules_pass_nft_check(tmp_path, archlab_site, host):
    plan = render.plan_host(archlab_site, host, credentials.ensure_secrets(archlab_site, tmp_path / "secrets"))
    path = tmp_path / "firewall.nft"
    path.write_text(file_of(plan, firewall.RULES_PATH).content)
    result = _nft_check(path)
    assert result.returncode == 0, result.stderr


def test_nft_check_rejects_broken_rules(tmp_path):
    path = tmp_path / "broken.nft"
    path.write_text("table inet dicomfleet {\n    chain input {\n        tcp dport 4242 ip saddr @absent accept\n"
                    "    }\n}\n")
    assert _nft_check(path).returncode != 0


def test_rules_loaded_outside_lab(example_site, tmp_path):
    plan = render.plan_host(example_site, "pacs1", credentials.ensure_secrets(example_site, tmp_path))
    assert firewall.UNIT in plan.services


def test_rules_not_loaded_in_lab(tmp_path):
    site = load_site(LAB)
    plan = render.plan_host(site, "central", credentials.ensure_secrets(site, tmp_path))
    assert (firewall.UNIT in plan.services, file_of(plan, firewall.RULES_PATH).restarts) == (False, ())


def test_firewall_off_writes_no_rules(tmp_path):
    path = tmp_path / "site.yml"
    path.write_text(EXAMPLE.read_text().replace("          dicomfleet_orthanc_name: pacs1\n",
                                                "          dicomfleet_orthanc_name: pacs1\n"
                                                "          dicomfleet_firewall: false\n"))
    site = load_site(path)
    plan = render.plan_host(site, "pacs1", credentials.ensure_secrets(site, tmp_path / "s"))
    assert [f.path for f in plan.files if f.path == firewall.RULES_PATH] == []


def test_host_name_address_rejected(tmp_path):
    path = tmp_path / "site.yml"
    path.write_text(EXAMPLE.read_text().replace("ansible_host: 198.51.100.12", "ansible_host: ct2.example.org"))
    with pytest.raises(InventoryError) as caught:
        load_site(path)
    assert "host ct-room2: ansible_host: 'ct2.example.org' is a host name" in caught.value.problems[0]


def test_viewer_network_must_be_a_network(tmp_path):
    path = tmp_path / "site.yml"
    path.write_text(EXAMPLE.read_text().replace("[203.0.113.0/24]", "[viewers]"))
    with pytest.raises(InventoryError) as caught:
        load_site(path)
    assert "dicomfleet_viewer_networks: ['viewers'] contains 'viewers'" in caught.value.problems[0]
