"""nginx in front of Orthanc: TLS termination on each central host and a cluster's load balancer.

Orthanc serves plain HTTP on every interface and has no listen-address setting, so
nginx takes HTTPS on the host's own address and passes requests to Orthanc over
loopback, and the firewall closes Orthanc's HTTP port to the network. The
dashboard gets its own HTTPS server block on its own port, in front of its plain
HTTP listener on loopback.
"""

from __future__ import annotations

import ipaddress

from dicomfleet import cluster as clusters
from dicomfleet import credentials, firewall, render, tls
from dicomfleet.dashboard import rollout
from dicomfleet.inventory import Machine, OrthancServer, Site

NGINX_UNIT = "nginx.service"
PROXY_SNIPPET = "/etc/nginx/snippets/dicomfleet-proxy.conf"
TLS_SNIPPET = "/etc/nginx/snippets/dicomfleet-tls.conf"
FRONT_SITE = "/etc/nginx/sites-enabled/dicomfleet-orthanc.conf"
DEFAULT_SITE = "/etc/nginx/sites-enabled/default"
HARDENING_DROP_IN = "/etc/systemd/system/nginx.service.d/dicomfleet-hardening.conf"
DEFAULT_HTTPS_PORT = 443
# The temporary folders Debian's nginx is built with; nginx running as www-data cannot create them.
TEMPORARY_DIRS = tuple(f"/var/lib/nginx/{name}" for name in ("body", "proxy", "fastcgi", "scgi", "uwsgi"))


def tls_enabled(site: Site, host: str) -> bool:
    """Return True when nginx terminates TLS in front of HOST's Orthanc (``dicomfleet_tls``, default true)."""
    return bool(site.hosts[host].vars.get("dicomfleet_tls", True))


def https_port(site: Site, host: str) -> int:
    """Return the port nginx serves HTTPS on for HOST's Orthanc (``dicomfleet_https_port``, default 443)."""
    return int(site.hosts[host].vars.get("dicomfleet_https_port", DEFAULT_HTTPS_PORT))


def url_host(address: str) -> str:
    """Return ADDRESS as it appears in a URL or an nginx listen directive (IPv6 in brackets)."""
    try:
        if ipaddress.ip_address(address).version == 6:
            return f"[{address}]"
    except ValueError:
        pass
    return address


def orthanc_https_url(site: Site, server: OrthancServer) -> str:
    """Return the HTTPS URL of SERVER's own nginx."""
    return f"https://{url_host(server.address)}:{https_port(site, server.host)}"


def machine_url(site: Site, machine: Machine) -> str:
    """Return the REST URL MACHINE's agent sends to: a cluster's balancer, HTTPS, or plain HTTP without TLS."""
    cluster = clusters.cluster_of(site, machine.orthanc)
    if cluster is not None:
        return cluster.url
    server = site.server_of(machine)
    if tls_enabled(site, server.host):
        return orthanc_https_url(site, server)
    return server.url


def public_url(site: Site, server: OrthancServer) -> str:
    """Return the URL viewers use for SERVER: its cluster's balancer, its HTTPS front, or plain HTTP."""
    cluster = clusters.cluster_of(site, server.host)
    if cluster is not None:
        return cluster.url
    if tls_enabled(site, server.host):
        return orthanc_https_url(site, server)
    return server.url


def _add(plan: render.HostPlan, managed: render.ManagedFile) -> None:
    """Append MANAGED to PLAN unless a file of the same path is there already."""
    if any(existing.path == managed.path for existing in plan.files):
        return
    plan.files.append(managed)


def _root_file(path: str, content: str, template: str, mode: str = "0644", secret: bool = False,
               restarts: tuple[str, ...] = (NGINX_UNIT,)) -> render.ManagedFile:
    return render.ManagedFile(path=path, content=content, mode=mode, owner="root", group="root",
                              template=template, restarts=restarts, secret=secret)


def nginx_ports(site: Site, host: str) -> set[int]:
    """Return the ports nginx listens on on HOST: its HTTPS fronts and the clusters it balances."""
    ports = set()
    if host in site.servers and tls_enabled(site, host):
        ports.add(https_port(site, host))
        ports.add(rollout.dashboard_https_port(site.servers[host]))
    ports.update(cluster.balancer_port for cluster in clusters.balancer_hosts(site).get(host, []))
    return ports


def ip_allow(site: Site, host: str) -> list[str]:
    """Return the addresses nginx on HOST may talk to, for systemd's IPAddressAllow=.

    They are the sources of the firewall's HTTPS rules, the nodes a balancer
    reaches, and loopback. Without a firewall on HOST the list is empty, which
    leaves nginx's sockets unrestricted.
    """
    if not firewall.enabled(site, host):
        return []

    ports = nginx_ports(site, host)
    balanced = clusters.balancer_hosts(site).get(host, [])
    allowed = ["localhost"]
    for rule in firewall.rules_for(site, host):
        if rule.port in ports:
            allowed.extend(source for source in rule.sources if source not in allowed)
    for cluster in balanced:
        for node in cluster.nodes:
            address = site.servers[node].address
            if address not in allowed:
                allowed.append(address)
    return allowed


def _plan_nginx(plan: render.HostPlan, site: Site, host: str, secrets: credentials.SiteSecrets,
                dns_names: list[str]) -> None:
    """Add nginx itself to PLAN: the package, its sandbox, the TLS material and the shared snippets."""
    if NGINX_UNIT in plan.services:
        return

    plan.apt_packages.append("nginx")
    plan.directories.append(render.ManagedDirectory("/etc/dicomfleet", "0755", "root", "root"))
    plan.directories.append(render.ManagedDirectory(tls.TLS_DIR, "0755", "root", "root"))
    for folder in TEMPORARY_DIRS:
        plan.directories.append(render.ManagedDirectory(folder, "0700", "www-data", "www-data"))

    certificate = tls.host_certificate(site, host, secrets, dns_names)
    _add(plan, _root_file(f"{tls.TLS_DIR}/server.pem", certificate.certificate, ""))
    # nginx runs as www-data (see templates/nginx-hardening.conf.j2), which reads the key through its group.
    _add(plan, render.ManagedFile(f"{tls.TLS_DIR}/server.key", certificate.key, "0640", "root", "www-data", "",
                                  (NGINX_UNIT,), secret=True))
    _add(plan, _root_file(tls.CA_FILE, certificate.ca, ""))

    context = {
        "host": host,
        "site": site,
        "tls_dir": tls.TLS_DIR,
        "ip_allow": ip_allow(site, host),
        "privileged_ports": any(port < 1024 for port in nginx_ports(site, host)),
    }
    _add(plan, _root_file(PROXY_SNIPPET, render.render_template("nginx-proxy-headers.conf.j2", context),
                          "nginx-proxy-headers.conf.j2"))
    _add(plan, _root_file(TLS_SNIPPET, render.render_template("nginx-tls.conf.j2", context),
                          "nginx-tls.conf.j2"))
    _add(plan, _root_file(HARDENING_DROP_IN, render.render_template("nginx-hardening.conf.j2", context),
                          "nginx-hardening.conf.j2"))

    # Debian's default site listens on port 80 of every address; nothing of dicomfleet serves there.
    plan.removed_paths.append(render.RemovedPath(DEFAULT_SITE, (NGINX_UNIT,)))
    plan.services.append(NGINX_UNIT)


def plan_front(plan: render.HostPlan, site: Site, server: OrthancServer,
               secrets: credentials.SiteSecrets) -> None:
    """Add to PLAN the nginx that serves SERVER's Orthanc and its dashboard over HTTPS on the host's address."""
    cluster = clusters.cluster_of(site, server.host)
    dns_names = [cluster.verify_name] if cluster is not None else []
    _plan_nginx(plan, site, server.host, secrets, dns_names)

    context = {
        "host": server.host,
        "site": site,
        "server": server,
        "listen": f"{url_host(server.address)}:{https_port(site, server.host)}",
    }
    _add(plan, _root_file(FRONT_SITE, render.render_template("nginx-orthanc.conf.j2", context),
                          "nginx-orthanc.conf.j2"))

    dashboard = {
        **context,
        "listen": f"{url_host(server.address)}:{rollout.dashboard_https_port(server)}",
        "upstream": f"{url_host(rollout.listen_address(server))}:{rollout.dashboard_port(server)}",
    }
    _add(plan, _root_file(rollout.NGINX_SITE, render.render_template("nginx-dashboard.conf.j2", dashboard),
                          "nginx-dashboard.conf.j2"))


def plan_balancer(plan: render.HostPlan, site: Site, host: str, balanced: list[clusters.Cluster],
                  secrets: credentials.SiteSecrets) -> None:
    """Add to PLAN the nginx that balances the clusters BALANCED over their nodes' HTTPS fronts."""
    own_cluster = clusters.cluster_of(site, host)
    dns_names = [own_cluster.verify_name] if own_cluster is not None else []
    _plan_nginx(plan, site, host, secrets, dns_names)
    if "balancer" not in plan.roles:
        plan.roles.append("balancer")

    for cluster in balanced:
        nodes = []
        for node in cluster.nodes:
            server = site.servers[node]
            nodes.append({"host": node,
                          "endpoint": f"{url_host(server.address)}:{https_port(site, node)}"})
        context = {
            "host": host,
            "site": site,
            "cluster": cluster,
            "nodes": nodes,
            "ca_file": tls.CA_FILE,
            "listen": f"{url_host(cluster.balancer_address)}:{cluster.balancer_port}",
        }
        _add(plan, _root_file(f"/etc/nginx/sites-enabled/dicomfleet-balancer-{cluster.name}.conf",
                              render.render_template("nginx-balancer.conf.j2", context),
                              "nginx-balancer.conf.j2"))
