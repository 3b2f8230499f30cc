"""Clusters rendered from the inventory: shared PostgreSQL index, one sync, the balancer, the checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import tomllib

import pytest
import yaml

from dicomfleet import cluster, credentials, postgresql, proxy, render, tls
from dicomfleet.inventory import InventoryError, load_site
from test_archive_support import file_of, inventory_document


@pytest.fixture
def site(tmp_path):
    path = tmp_path / "archlab.yml"
    path.write_text(yaml.safe_dump(inventory_document()))
    return load_site(path)


@pytest.fixture
def secrets(site, tmp_path):
    return credentials.ensure_secrets(site, tmp_path / "secrets")


def _problems(tmp_path, change) -> list[str]:
    document = inventory_document()
    change(document["all"]["children"]["central"]["children"]["cluster_main"])
    path = tmp_path / "changed.yml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(InventoryError) as caught:
        load_site(path)
    return caught.value.problems


def test_cluster_nodes_and_primary(site):
    (main,) = cluster.clusters(site).values()
    assert (main.nodes, main.primary, main.balancer, main.postgresql_host) == (("n1", "n2"), "n1", "db", "db")


def test_service_hosts_deployed(site):
    assert render.deployed_hosts(site) == ["vault", "n1", "n2", "fs", "db"]


def test_sync_only_on_primary(site, secrets):
    services = {host: render.plan_host(site, host, secrets).services for host in ("n1", "n2")}
    assert ("dicomfleet-sync.service" in services["n1"], "dicomfleet-sync.service" in services["n2"]) == (True, False)


def test_embedded_mongodb_only_on_primary(site, secrets):
    plan = render.plan_host(site, "n2", secrets)
    assert "dicomfleet-mongodb.service" not in plan.services


def test_backups_only_on_primary(site, secrets):
    plan = render.plan_host(site, "n2", secrets)
    assert [unit for unit in plan.services if "backup" in unit] == []


def test_primary_backs_up_postgresql(site, secrets):
    config = tomllib.loads(file_of(render.plan_host(site, "n1", secrets), "/etc/dicomfleet/backup.toml").content)
    assert config["index"] | {"keep": None} == {
        "kind": "postgresql", "keep": None, "host": "127.0.10.125", "port": 5532, "database": "orthanc_main",
        "username": "orthanc_main", "credential": "pgpass", "pgpass_file": postgresql.PGPASS}


def test_pgpass_root_only(site, secrets):
    managed = file_of(render.plan_host(site, "n1", secrets), postgresql.PGPASS)
    assert (managed.mode, managed.owner, managed.secret) == ("0600", "root", True)


def test_plugin_config_shares_index(site, secrets):
    managed = file_of(render.plan_host(site, "n2", secrets), postgresql.PLUGIN_CONFIG)
    settings = json.loads(managed.content)["PostgreSQL"]
    assert {key: settings[key] for key in ("EnableIndex", "Lock", "Host", "Port", "Database", "EnableSsl")} == {
        "EnableIndex": True, "Lock": False, "Host": "127.0.10.125", "Port": 5532, "Database": "orthanc_main",
        "EnableSsl": True}


def test_plugin_config_readable_by_orthanc_only(site, secrets):
    managed = file_of(render.plan_host(site, "n2", secrets), postgresql.PLUGIN_CONFIG)
    assert (managed.mode, managed.group, managed.secret) == ("0640", "orthanc", True)


def test_nodes_share_machines_users(site, secrets):
    users = {}
    for host in ("n1", "n2"):
        content = file_of(render.plan_host(site, host, secrets), "/etc/orthanc/credentials.json").content
        users[host] = sorted(json.loads(content)["RegisteredUsers"])
    assert users["n1"] == users["n2"]
    assert "ct1" in users["n2"]


def test_pg_hba_admits_nodes_over_tls(site, secrets):
    hba = file_of(render.plan_host(site, "db", secrets), f"{postgresql.CONFIG_DIR}/pg_hba.conf").content
    rules = [line.split() for line in hba.splitlines() if line.startswith("hostssl")]
    assert rules == [
        ["hostssl", "orthanc_main", "orthanc_main", "127.0.10.126/32", "scram-sha-256"],
        ["hostssl", "orthanc_main", "orthanc_main", "127.0.10.127/32", "scram-sha-256"],
        ["hostssl", "orthanc_main", "orthanc_main", "127.0.0.1/32", "scram-sha-256"],
    ]


def test_setup_sql_carries_verifier_not_password(site, secrets):
    sql = file_of(render.plan_host(site, "db", secrets), postgresql.SETUP_SQL).content
    (main,) = cluster.clusters(site).values()
    password = postgresql.password(main, secrets)
    assert (password in sql, postgresql.scram_verifier(password) in sql) == (False, True)


def test_setup_runs_when_its_files_change(site, secrets):
    (command,) = render.plan_host(site, "db", secrets).commands
    assert postgresql.SETUP_SQL in command.after_changes


def test_scram_verifier_matches_rfc7677_example():
    # RFC 7677 section 3: user "user", password "pencil", this salt and 4096 iterations.
    verifier = postgresql.scram_verifier("pencil", salt=base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="))
    _, keys = verifier.split("$", 2)[1:]
    stored_key, server_key = (base64.b64decode(part) for part in keys.split(":"))
    auth_message = ("n=user,r=rOprNGfwEbeRWgbNEkqO,"
                    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
                    "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0").encode()
    server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    client_proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(client_proof, client_signature))
    assert (base64.b64encode(server_signature).decode(), hashlib.sha256(client_key).digest()) == (
        "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=", stored_key)


def test_scram_verifier_stable(site, secrets):
    (main,) = cluster.clusters(site).values()
    password = postgresql.password(main, secrets)
    assert postgresql.scram_verifier(password) == postgresql.scram_verifier(password)


def test_balancer_checks_node_certificates(site, secrets):
    config = file_of(render.plan_host(site, "db", secrets),
                     "/etc/nginx/sites-enabled/dicomfleet-balancer-main.conf").content
    assert "server 127.0.10.126:8646 max_fails=1 fail_timeout=10s;" in config
    assert "server 127.0.10.127:8647 max_fails=1 fail_timeout=10s;" in config
    assert "proxy_ssl_verify on;" in config
    assert "proxy_ssl_name main.orthanc-cluster.internal;" in config


def test_node_certificate_carries_cluster_name(site, secrets):
    from cryptography import x509

    pem = file_of(render.plan_host(site, "n2", secrets), f"{tls.TLS_DIR}/server.pem").content
    names = x509.load_pem_x509_certificate(pem.encode()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert sorted(str(name.value) for name in names) == ["127.0.10.127", "main.orthanc-cluster.internal"]


def test_machine_url_is_balancer(site):
    assert proxy.machine_url(site, site.machines["ct1"]) == "https://127.0.10.125:8743"


def test_missing_balancer_rejected(tmp_path):
    problems = _problems(tmp_path, lambda group: group["vars"].pop("dicomfleet_cluster_balancer"))
    assert "host n1: dicomfleet_cluster_balancer: missing; every node of cluster 'main' needs it" in problems[0]


def test_unknown_postgresql_host_rejected(tmp_path):
    problems = _problems(tmp_path, lambda group: group["vars"].update(dicomfleet_postgresql_host="pg9"))
    assert "host n1: dicomfleet_postgresql_host: 'pg9' is not a host of the inventory" in problems[0]


def test_nodes_with_different_storage_rejected(tmp_path):
    problems = _problems(tmp_path, lambda group: group["hosts"]["n2"].update(
        dicomfleet_orthanc_storage_directory="/srv/other"))
    assert ("host n2: dicomfleet_orthanc_storage_directory: '/srv/other' differs from "
            "'/srv/dicomfleet/storage' on node n1") in problems[0]


def test_cluster_without_storage_rejected(tmp_path):
    problems = _problems(tmp_path, lambda group: group["vars"].pop("dicomfleet_orthanc_storage_directory"))
    assert "host n1: dicomfleet_orthanc_storage_directory: missing" in problems[0]


def test_cluster_name_checked(tmp_path):
    problems = _problems(tmp_path, lambda group: group["vars"].update(dicomfleet_cluster="Main Cluster"))
    assert "dicomfleet_cluster: 'Main Cluster' must be 1 to 32 characters" in problems[0]
